"""The Trainer's owners: the evaluator it is given and the run layout's paths."""

import os

import pytest
import tensorflow as tf

from leo_suite.models import registry
from leo_suite.training import evaluation
from leo_suite.training import layout
from leo_suite.training import trainer as trainer_lib


def maml():
  return registry.build("maml", registry.spec("maml").config_class(), 3, 8)


def test_validation_needs_the_trained_learners_own_evaluator(tmp_path):
  learner = maml()
  config = trainer_lib.TrainConfig(checkpoint_path=str(tmp_path))
  with pytest.raises(ValueError, match="needs the learner's evaluator"):
    trainer_lib.Trainer(learner, config, None, val_sampler=object())
  with pytest.raises(ValueError, match="another learner"):
    trainer_lib.Trainer(learner, config, None, evaluator=evaluation.Evaluator(maml()))
  evaluator = evaluation.Evaluator(learner)
  trainer = trainer_lib.Trainer(learner, config, None, object(), evaluator=evaluator)
  assert trainer.evaluator is evaluator
  assert trainer_lib.Trainer(learner, config, None).validate() is None  # no validation set


def test_a_non_chief_worker_saves_into_its_scratch_checkpoint_then_removes_it(
    tmp_path, monkeypatch):
  monkeypatch.setattr(trainer_lib.distribute, "worker_info", lambda strategy: (False, 1, 2))
  files = layout.RunDirectory(str(tmp_path / "run"))
  trainer = trainer_lib.Trainer(maml(), trainer_lib.TrainConfig(checkpoint_path=files.directory),
                                None)
  real_write, written = tf.train.Checkpoint.write, []

  def write(checkpoint, path, *args, **kwargs):
    result = real_write(checkpoint, path, *args, **kwargs)
    written.append((path, sorted(os.listdir(os.path.dirname(path)))))
    return result
  monkeypatch.setattr(tf.train.Checkpoint, "write", write)
  trainer._save(1)  # pylint: disable=protected-access
  scratch_checkpoint = files.worker_checkpoint(1)
  assert scratch_checkpoint == str(tmp_path / "run" / ".worker-1" / layout.CHECKPOINT_NAME)
  assert [path for path, _ in written] == [scratch_checkpoint]
  assert "ckpt.index" in written[0][1]                 # it was really written there
  assert not os.path.exists(files.worker_scratch(1))   # and removed after
  assert files.latest_checkpoint() is None             # only the chief keeps checkpoints
