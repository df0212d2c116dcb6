"""FLOPs of a learner's evaluation task and this machine's matmul rate: the
arithmetic limit of evaluation (issue 32, item 3).

`task_flops` counts one task (adapt on N*K support rows, predict N*V
queries; the benchmark's: N = 5, V = 600 - K, D = 640) in the traced graph of
the evaluation path that ran it (`evaluation.task_accuracy` on the gather
path, `evaluation.table_task_accuracy` on the table path, where a learner may
keep a cheaper adapted state, e.g. Reptile's span of the support rows), over
the ops its result reads:

  * matrix products as 2 m n k: MatMul and BatchMatMul (TensorFlow's own
    count of an adjointed BatchMatMul is wrong, `matmul_flops`), Einsum (2 x
    the product of every index size, 1 x with nothing contracted), Cholesky
    (n^3 / 3) and triangular solves (n^2 per right-hand column);
  * every other op TensorFlow registers a "flops" statistic for (the counts
    `tf.compat.v1.profiler`'s float_operation reports: convolutions,
    elementwise Add/Mul/Sub/..., Softmax, Sum, Mean, ArgMax);
  * the bodies of function calls and conditionals (the costlier branch),
    and tf.while_loop bodies times their trip count, read from the loop's
    condition (counter < constant, counter += 1) and maximum_iterations.
Activations and transcendental ops (Exp, Tanh, Relu, ...), data movement
(gather, reshape, concat) and random draws count nothing. Its `shared` part
reads the queries but no support row (the query row map); the table path of
evaluation runs that once per row of the test split, not once per task
(`evaluation_limits`).

limit = matmul FLOP/s / flops_per_task is the tasks/s a learner would reach
if all of its arithmetic ran at this machine's float32 matmul rate
(`matmul_rate`); an evaluation's limit_fraction is its tasks/s / limit.
"""

import collections
import dataclasses
import time

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops  # get_stats_for_node_def: the profiler's counts
from tensorflow.python.profiler.internal import flops_registry  # pylint: disable=unused-import

from leo_suite.bench.report import BATCH, DIM, IMAGES_PER_CLASS, NUM_WAYS, TRAIN_QUERIES
from leo_suite.data.episodes import Episode
from leo_suite.training import evaluation

MATMUL_OPS = ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")
CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")
IF_OPS = ("If", "StatelessIf")
WHILE_OPS = ("While", "StatelessWhile")
TRIANGULAR_SOLVE_OPS = ("MatrixTriangularSolve", "BatchMatrixTriangularSolve")


def shape_of(tensor):
  shape = tensor.shape
  if not shape.is_fully_defined():
    raise ValueError(f"flops: {tensor.name} has an unknown shape {shape}")
  return shape.as_list()


def einsum_flops(op):
  """2 x the product of every index's size (1 x when nothing is contracted)."""
  equation = op.get_attr("equation").decode().replace(" ", "")
  inputs, output = equation.split("->")
  sizes = {}
  for letters, tensor in zip(inputs.split(","), op.inputs):
    if "." in letters:
      raise ValueError(f"flops: einsum with an ellipsis ({equation}) is not counted")
    sizes.update(zip(letters, shape_of(tensor)))
  contracted = set(sizes) - set(output)
  if len(op.inputs) == 1:
    return int(np.prod(shape_of(op.inputs[0]))) if contracted else 0
  return (2 if contracted else 1) * int(np.prod(list(sizes.values())))


def matmul_flops(op):
  """2 m n k per output matrix. TensorFlow's registered BatchMatMul count reads
  the contraction size as if the product were never adjointed (it looks for
  MatMul's transpose_a, not BatchMatMul's adj_x): X^T A with X [M, D] counts
  2 D N D there, 2 D N M here."""
  adjoint = op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x")
  contracted = shape_of(op.inputs[0])[-2 if adjoint else -1]
  return 2 * contracted * int(np.prod(shape_of(op.outputs[0])))


def linalg_flops(op):
  """Cholesky: n^3 / 3 per matrix; a triangular solve: n^2 per right-hand column."""
  if op.type == "Cholesky":
    *batch, n, _ = shape_of(op.inputs[0])
    return int(np.prod(batch)) * n ** 3 // 3
  *batch, n, columns = shape_of(op.inputs[1])
  return int(np.prod(batch)) * n * n * columns


def op_flops(op):
  """FLOPs of one op outside control flow (0 when nothing is registered)."""
  if op.type == "Einsum":
    return einsum_flops(op)
  if op.type in MATMUL_OPS:
    return matmul_flops(op)
  if op.type == "Cholesky" or op.type in TRIANGULAR_SOLVE_OPS:
    return linalg_flops(op)
  try:
    value = tf_ops.get_stats_for_node_def(op.graph, op.node_def, "flops").value
  except ValueError as exc:  # a registered count that needs an unknown shape
    raise ValueError(f"flops: cannot count {op.type} {op.name}: {exc}") from exc
  return int(value or 0)


def function_graph(op, attribute):
  return op.graph._functions[op.get_attr(attribute).name].graph  # pylint: disable=protected-access


def trip_count(op):
  """Iterations of a while_v2 loop: the `counter < constant` of its condition
  (a counter that starts at a constant and steps by 1 in the body), at most
  maximum_iterations when that is set; ValueError when neither is constant."""
  maximum = tf.get_static_value(op.inputs[1])  # while_v2's loop vars: counter, maximum, ...
  maximum = int(maximum) if maximum is not None and maximum >= 0 else None
  cond, body = function_graph(op, "cond"), function_graph(op, "body")
  bounds = []
  for less in [o for o in cond.get_operations() if o.type == "Less"]:
    indices = [i for i, t in enumerate(cond.inputs) if t is less.inputs[0]]
    if not indices or indices[0] < 2:  # not a loop variable of the user's condition
      continue
    bound = tf.get_static_value(less.inputs[1])
    start = tf.get_static_value(op.inputs[indices[0]])
    step = body.outputs[indices[0]].op
    while step.type == "Identity":
      step = step.inputs[0].op
    if (bound is not None and start is not None and step.type in ("AddV2", "Add")
        and step.inputs[0] is body.inputs[indices[0]]
        and tf.get_static_value(step.inputs[1]) == 1):
      bounds.append(max(0, int(bound) - int(start)))
  if maximum is not None:
    bounds.append(maximum)
  if not bounds:
    raise ValueError(f"flops: the trip count of {op.name} is not a constant bound")
  return min(bounds)


def live_ops(graph):
  """The ops of `graph` its outputs depend on (a traced graph also holds ops
  that run pruned: gradients nothing reads, e.g. a MatMul's input gradient)."""
  pending = [t.op for t in graph.outputs] + list(getattr(graph, "control_outputs", []))
  live = set()
  while pending:
    op = pending.pop()
    if op not in live:
      live.add(op)
      pending += [t.op for t in op.inputs] + list(op.control_inputs)
  return [op for op in graph.get_operations() if op in live]


def readers(tensors):
  """The ops that read `tensors`, directly or through other ops."""
  reached, pending = set(), [op for t in tensors for op in t.consumers()]
  while pending:
    op = pending.pop()
    if op not in reached:
      reached.add(op)
      pending += [reader for t in op.outputs for reader in t.consumers()]
  return reached


def graph_flops(graph, counts=None, times=1, ops=None):
  """collections.Counter op type -> FLOPs of the ops `graph`'s outputs depend
  on (those of them in `ops` if given), loops and calls included."""
  counts = collections.Counter() if counts is None else counts
  for op in live_ops(graph):
    if ops is not None and op not in ops:
      continue
    if op.type in CALL_OPS:
      graph_flops(function_graph(op, "f"), counts, times)
    elif op.type in IF_OPS:
      branches = [graph_flops(function_graph(op, key)) for key in ("then_branch", "else_branch")]
      counts.update({k: v * times for k, v in max(branches, key=lambda c: sum(c.values())).items()})
    elif op.type in WHILE_OPS:
      trips = trip_count(op)
      graph_flops(function_graph(op, "body"), counts, times * trips)
      graph_flops(function_graph(op, "cond"), counts, times * (trips + 1))
    else:
      flops = op_flops(op)
      if flops:
        counts[op.type] += flops * times
  return counts


def episode_spec(num_ways, shots, queries, dim, num_tasks=1):
  """TensorSpecs of an evaluation Episode (float32 features, int32 labels)."""
  def pair(examples):
    return (tf.TensorSpec([num_tasks, num_ways, examples, dim], tf.float32),
            tf.TensorSpec([num_tasks, num_ways, examples], tf.int32))
  return Episode(*pair(shots), *pair(queries))


def random_episode(shots, rng, batch=BATCH, ways=NUM_WAYS, dim=DIM, queries=TRAIN_QUERIES):
  """An Episode of unit-norm Gaussian features (numpy `rng`) at the benchmark's
  meta-training shapes, labels 0..ways-1 by class (what the probes time)."""
  def unit(shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return tf.constant(x / np.linalg.norm(x, axis=-1, keepdims=True))
  labels = lambda count: tf.constant(np.broadcast_to(
      np.arange(ways)[None, :, None], (batch, ways, count)).astype(np.int32))
  return Episode(unit((batch, ways, shots, dim)), labels(shots),
                 unit((batch, ways, queries, dim)), labels(queries))


SCORERS = {"gather": evaluation.task_accuracy, "table": evaluation.table_task_accuracy}


def evaluation_graph(learner, spec, method="gather"):
  """The graph of one evaluation path's task at `spec`: `evaluation.task_accuracy`
  (adapt, predict, accuracy: the gather path) or `evaluation.table_task_accuracy`
  (readout_state, the readout of the query rows: the table path)."""
  score = SCORERS[method]
  return tf.function(lambda episode: score(learner, episode), autograph=False
                     ).get_concrete_function(spec).graph


@dataclasses.dataclass(frozen=True)
class TaskFlops:
  total: int                        # adapt + predict + accuracy of one task
  shared: int                       # of which the ops read the queries, not the support set (the query row map)
  counts: collections.Counter       # op type -> FLOPs (the total's)


def task_flops(learner, num_ways, shots, queries, dim, method="gather") -> TaskFlops:
  """FLOPs of one evaluation task of `learner` (N = num_ways, K = shots,
  V = queries per class, D = dim) on the `method` path of evaluation
  ("gather" or "table": they may run different arithmetic, e.g. Reptile's
  factored first layer), and those of them that read the queries but not the
  support set (what the table path runs once per row, not once per task)."""
  graph = evaluation_graph(learner, episode_spec(num_ways, shots, queries, dim), method)
  counts = graph_flops(graph)
  # Episode: support_x, support_y, query_x, query_y (then captured variables)
  shared = graph_flops(graph, ops=readers(graph.inputs[2:4]) - readers(graph.inputs[:2]))
  return TaskFlops(sum(counts.values()), sum(shared.values()), counts)


def train_step_flops(learner, num_ways, shots, queries, dim, batch) -> collections.Counter:
  """Op type -> FLOPs of one meta-training step's loss and gradients (`loss_and_gradients`
  on a meta-batch of `batch` tasks, training mode: dropout and samples
  included), what the Trainer's step computes before its optimiser update."""
  def step(episode):
    loss, grads, _ = learner.loss_and_gradients(episode, seed=tf.constant([1, 2]))
    return [loss] + [g for g in grads if g is not None]
  spec = episode_spec(num_ways, shots, queries, dim, num_tasks=batch)
  return graph_flops(tf.function(step, autograph=False).get_concrete_function(spec).graph)


def training_limits(learner, shots, row, rate):
  """A meta-training row's FLOPs per task and limit at the benchmark's shapes
  (5-way, V = TRAIN_QUERIES, D = DIM, meta-batch BATCH), against its faster
  of plain and XLA tasks/s: train_flops_per_task, train_limit_tasks_per_s,
  train_limit_fraction."""
  try:
    per_task = sum(train_step_flops(learner, NUM_WAYS, shots, TRAIN_QUERIES, DIM,
                                    BATCH).values()) / BATCH
  except ValueError as exc:
    return {"train_flops_error": str(exc)[:300]}
  steps = max([row[k] for k in ("batched", "xla") if row.get(k)], default=None)
  return {f"train_{k}": v for k, v in
          limit_columns(steps * BATCH if steps else None, per_task, rate).items()}


def has_readout(learner, spec):
  """Whether `learner.readout` gives the tasks of `spec` (their readout_state) a `Readout`
  (the table path then maps each query row once, not once per task)."""
  found = []

  def probe(episode):
    state = learner.readout_state(episode.support_x, episode.support_y,
                                  seed=tf.zeros([2], tf.int32))
    found.append(learner.readout(state) is not None)
    return tf.constant(0)
  tf.function(probe, autograph=False).get_concrete_function(spec)
  return found[0]


def matmul_rate(size=2048, repeats=5):
  """Best-of-`repeats` float32 FLOP/s of a [size, size] x [size, size] tf.matmul."""
  a = tf.random.stateless_normal([size, size], seed=[0, 1])
  b = tf.random.stateless_normal([size, size], seed=[0, 2])
  product = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)[0, :1]), autograph=False)
  product().numpy()  # trace and warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    product().numpy()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def limit_columns(tasks_per_s, flops_per_task, rate):
  """{flops_per_task, limit_tasks_per_s, limit_fraction} of one evaluation row."""
  limit = rate / flops_per_task if flops_per_task and rate else None
  return {"flops_per_task": flops_per_task, "limit_tasks_per_s": limit,
          "limit_fraction": tasks_per_s / limit if tasks_per_s and limit else None}


def evaluation_limits(learner, shots, row, rate, split):
  """An evaluation row's FLOPs per task and limit at the benchmark's shapes
  (N = NUM_WAYS, V = IMAGES_PER_CLASS - shots, D = DIM), counted on the path
  the row ran (row["method"]): the whole task (task_flops), of which
  shared_flops read the queries and no support row; on the table path with a readout the
  query row map runs once per row of `split` per evaluation of row["tasks"]
  tasks, so flops_per_task counts the task's own FLOPs plus that share.
  flops_error when the graph cannot be counted."""
  queries = IMAGES_PER_CLASS - shots
  spec = episode_spec(NUM_WAYS, shots, queries, DIM)
  method = "table" if row.get("method") == "table" else "gather"
  try:
    count = task_flops(learner, NUM_WAYS, shots, queries, DIM, method)
  except ValueError as exc:
    return {"flops_error": str(exc)[:300]}
  per_task = count.total
  if method == "table" and has_readout(learner, spec):
    rows_per_task = len(split.embeddings) / row["tasks"]
    per_task += count.shared * (rows_per_task / (NUM_WAYS * queries) - 1)
  return dict(task_flops=count.total, shared_flops=count.shared,
              **limit_columns(row.get("tasks_per_s"), per_task, rate))
