"""leo_suite/bench/flops.py: FLOPs per evaluation task against closed forms
(2 m n k products, one inner step of MAML and Reptile, loop trip counts) and
against TensorFlow's own profiler on the loop-free learners' graphs."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite.bench import benchmark
from leo_suite.bench import flops
from leo_suite.bench import report
from leo_suite.training import evaluation

N, D = 5, 640


def traced(function, *specs):
  return tf.function(function).get_concrete_function(*specs).graph


def profiler_node_flops(graph):
  """TensorFlow's profiler (float_operation): node name -> FLOPs (the graph's
  own nodes; it does not look into function bodies)."""
  options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  options["output"] = "none"
  nodes, pending = {}, [tf.compat.v1.profiler.profile(graph=graph, options=options)]
  while pending:
    node = pending.pop()
    nodes[node.name] = node.float_ops
    pending += list(node.children)
  return nodes


def products(counts):
  return sum(v for k, v in counts.items()
             if k in flops.MATMUL_OPS + ("Einsum", "Cholesky", "MatrixTriangularSolve"))


def spec(*shape):
  return tf.TensorSpec(shape, tf.float32)


@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False),
                                                     (False, True), (True, True)])
def test_matmul_is_2mnk_as_the_profiler_counts_it(transpose_a, transpose_b):
  a = spec(*((7, 3) if transpose_a else (3, 7)))
  b = spec(*((11, 7) if transpose_b else (7, 11)))
  graph = traced(lambda a, b: tf.matmul(a, b, transpose_a=transpose_a,
                                        transpose_b=transpose_b), a, b)
  assert flops.graph_flops(graph) == {"MatMul": 2 * 3 * 7 * 11}
  assert sum(profiler_node_flops(graph).values()) == 2 * 3 * 7 * 11


def test_batch_matmul_counts_the_contracted_size_under_an_adjoint():
  # X^T A with X [2, 25, 640], A [2, 25, 5]: 2 * 2 * 640 * 5 * 25 (MAML's
  # fast weights). TensorFlow's registered count takes k = 640 (it reads
  # MatMul's transpose_a, which BatchMatMul does not have).
  graph = traced(lambda x, a: tf.matmul(x, a, transpose_a=True), spec(2, 25, 640),
                 spec(2, 25, 5))
  assert flops.graph_flops(graph) == {"BatchMatMulV2": 2 * 2 * 640 * 5 * 25}
  graph = traced(lambda x, y: tf.matmul(x, y, transpose_b=True), spec(2, 25, 640),
                 spec(2, 30, 640))
  assert flops.graph_flops(graph) == {"BatchMatMulV2": 2 * 2 * 25 * 30 * 640}
  assert sum(profiler_node_flops(graph).values()) == 2 * 2 * 25 * 30 * 640


def test_einsum_and_linear_algebra():
  graph = traced(lambda x, w: tf.einsum("bnvd,bdc->bnvc", x, w), spec(2, 5, 9, 16),
                 spec(2, 16, 3))
  assert flops.graph_flops(graph) == {"Einsum": 2 * 2 * 5 * 9 * 16 * 3}
  graph = traced(lambda x, y: tf.einsum("i,j->ij", x, y), spec(4), spec(6))
  assert flops.graph_flops(graph) == {"Einsum": 4 * 6}   # nothing contracted: products only
  graph = traced(lambda x: tf.einsum("ij->j", x), spec(4, 6))
  assert flops.graph_flops(graph) == {"Einsum": 24}
  graph = traced(lambda a, b: tf.linalg.cholesky_solve(tf.linalg.cholesky(a), b),
                 spec(3, 12, 12), spec(3, 12, 4))
  assert flops.graph_flops(graph) == {"Cholesky": 3 * 12 ** 3 // 3,
                                      "MatrixTriangularSolve": 2 * 3 * 12 * 12 * 4}


def test_while_loops_count_their_trip_count_and_unread_ops_count_nothing():
  def loop(x, w, trips, maximum=None):
    _, y = tf.while_loop(lambda i, y: i < trips, lambda i, y: (i + 1, tf.matmul(y, w)),
                         (tf.constant(2), x), maximum_iterations=maximum)
    return y
  one = 2 * 3 * 8 * 8
  for trips, maximum, expected in ((9, None, 7), (9, 4, 4), (9, 20, 7), (2, None, 0)):
    graph = traced(lambda x, w: loop(x, w, trips, maximum), spec(3, 8), spec(8, 8))
    counts = flops.graph_flops(graph)
    assert counts["MatMul"] == expected * one
    # per trip the body's i + 1 and while_v2's own counter + 1
    assert counts["AddV2"] == 2 * expected
    if maximum is None:  # the condition's i < trips, once more than the body
      assert counts["Less"] == expected + 1
  graph = traced(lambda x, w, n: loop(x, w, n), spec(3, 8), spec(8, 8),
                 tf.TensorSpec([], tf.int32))
  with pytest.raises(ValueError, match="trip count"):
    flops.graph_flops(graph)
  # a product nothing reads (as the input gradient of a tape) is pruned
  graph = traced(lambda x, w: (tf.matmul(x, w), tf.matmul(w, w))[0], spec(3, 8), spec(8, 8))
  assert flops.graph_flops(graph) == {"MatMul": one}


def learner_graph(model, shots, **overrides):
  learner = benchmark.build(model, overrides)
  return flops.evaluation_graph(learner, flops.episode_spec(N, shots, 600 - shots, D))


@pytest.mark.parametrize("model", ["protonet", "matching", "relation", "r2d2"])
def test_loop_free_learners_agree_with_the_profiler_node_by_node(model):
  """Every node the profiler counts has its figure; the only extra FLOPs are
  the products it does not count (Einsum, Cholesky, triangular solves) and
  adjointed batch products (none in these graphs)."""
  graph = learner_graph(model, 5)
  ops = flops.live_ops(graph)
  assert not [op for op in ops if op.type in flops.WHILE_OPS]
  profiled = profiler_node_flops(graph)
  extra = 0
  for op in ops:
    if op.type in flops.IF_OPS + flops.CALL_OPS:
      continue  # the profiler does not look inside (Matching's label smoothing branch)
    counted = flops.op_flops(op)
    if op.type in ("Einsum", "Cholesky", "MatrixTriangularSolve"):
      assert profiled.get(op.name, 0) == 0
      extra += counted
    else:
      assert counted == profiled.get(op.name, 0), op.name
  total = flops.task_flops(benchmark.build(model), N, 5, 595, D).total
  live = {op.name for op in ops}
  pruned = sum(v for name, v in profiled.items() if name not in live)
  branches = total - extra - (sum(profiled.values()) - pruned)
  assert branches >= 0 and (branches == 0) == (model != "matching")


@pytest.mark.parametrize("shots", [1, 5])
def test_protonet_and_r2d2_closed_forms(shots):
  m, q = N * shots, N * (600 - shots)   # support and query rows
  count = flops.task_flops(benchmark.build("protonet"), N, shots, 600 - shots, D)
  # the linear map D -> D of every row; prototypes (one-hot^T f(S)); queries . prototypes
  assert count.counts["MatMul"] == 2 * (m + q) * D * D
  assert count.counts["Einsum"] == 2 * m * N * D + 2 * q * N * D
  # what reads the queries and no support row: f(query) and its squared norm (D squares, D - 1 additions)
  assert count.shared == 2 * q * D * D + q * D + q * (D - 1)
  counts = flops.task_flops(benchmark.build("r2d2"), N, shots, 600 - shots, D).counts
  p = D + 1  # features with the bias column
  # Gram X X^T, Cholesky, two triangular solves, W = X^T alpha, query logits
  assert products(counts) == (2 * m * m * p + m ** 3 // 3 + 2 * m * m * N + 2 * m * p * N
                              + 2 * q * D * N)


@pytest.mark.parametrize("shots", [1, 5])
def test_maml_linear_head_closed_form_and_one_inner_step(shots):
  """MAML's linear head adapts in logit space (adaptation.linear_inner_loop):
  Gram X X^T, support logits X W, one [M, M] x [M, N] product per step but the
  last (its logits are never read), fast weights X^T A, the query logits."""
  m, q = N * shots, N * (600 - shots)
  counts = {steps: products(flops.graph_flops(learner_graph("maml", shots,
                                                            eval_inner_steps=steps)))
            for steps in (3, 4)}
  assert counts[4] - counts[3] == 2 * m * m * N
  assert counts[3] == 2 * m * m * D + 2 * m * D * N + 2 * 2 * m * m * N + 2 * m * D * N \
      + 2 * q * D * N


def mlp_step(rows, hidden):
  """One gradient step of a D -> hidden -> N ReLU head on `rows` rows:
  forward 2 M (D H + H N), backward dW2, dh and dW1 (no input gradient)."""
  return 2 * rows * (D * hidden + hidden * N) + 2 * rows * (hidden * N + N * hidden + D * hidden)


def test_maml_mlp_head_one_inner_step_is_forward_and_backward():
  counts = {steps: products(flops.graph_flops(learner_graph(
      "maml", 5, hidden_sizes="32", eval_inner_steps=steps))) for steps in (2, 3)}
  assert counts[3] - counts[2] == mlp_step(N * 5, 32)


@pytest.mark.parametrize("shots", [1, 5])
def test_reptile_counts_its_while_loop_of_eval_inner_steps(shots):
  """Reptile's evaluation adapts in a tf.while_loop on the support rows'
  first pre-activations Z (adaptation.span_sgd_loop): X X^T and X theta once;
  per step the second layer's forward and backward and the first layer's
  delta (3 products of M x H x N) and Z's move K delta (M x M x H); then the
  first layer theta + X^T C and the adapted head on the queries."""
  config = benchmark.learner_config("reptile")
  hidden, q, m = int(config.hidden_sizes), N * (600 - shots), N * shots
  for steps in (3, config.eval_inner_steps):
    counts = flops.graph_flops(learner_graph("reptile", shots, eval_inner_steps=steps))
    once = 2 * m * m * D + 2 * (2 * m * D * hidden)
    per_step = 3 * 2 * m * hidden * N + 2 * m * m * hidden
    assert products(counts) == once + steps * per_step + 2 * q * (D * hidden + hidden * N)


@pytest.mark.parametrize("shots", [1, 5])
def test_reptile_table_path_scores_queries_through_the_span(shots):
  """On the table path Reptile keeps its first layer as theta plus the span of
  the support rows (heads.SpanHead): each query row maps once to x theta
  (q D H, shared by every task), and per task costs x S^T (D M), its move
  through the coefficients (M H) and the second layer (H N); the adaptation
  is the same while loop as on the gather path."""
  config = benchmark.learner_config("reptile")
  hidden, q, m = int(config.hidden_sizes), N * (600 - shots), N * shots
  learner = benchmark.build("reptile", {"eval_inner_steps": 3})
  count = flops.task_flops(learner, N, shots, 600 - shots, D, "table")
  once = 2 * m * m * D + 2 * m * D * hidden  # X X^T, X theta; no dense theta + X^T C
  per_step = 3 * 2 * m * hidden * N + 2 * m * m * hidden
  shared = 2 * q * D * hidden
  assert products(count.counts) == (once + 3 * per_step + shared
                                    + 2 * q * (D * m + m * hidden + hidden * N))
  # the row map, once per row of the split (and SpanHead's scale x it, q H)
  assert shared <= count.shared <= shared + q * hidden
  gather = flops.task_flops(learner, N, shots, 600 - shots, D, "gather")
  assert gather.total > 5 * (count.total - shared)  # there q D H per task


@pytest.mark.parametrize("model", report.MODELS)
def test_the_table_path_scores_as_task_accuracy(model):
  """The graph the table path's FLOPs are counted on computes the task's
  accuracy: evaluation.table_task_accuracy equals task_accuracy (up to one
  float32 near-tie among the 50 queries)."""
  learner = benchmark.build(model)
  support = tf.random.stateless_normal([1, N, 1, D], seed=[3, 1])
  query = support + 0.8 * tf.random.stateless_normal([1, N, 10, D], seed=[3, 2])
  labels = lambda k: tf.broadcast_to(tf.range(N)[:, tf.newaxis], [N, k])[tf.newaxis]
  episode = flops.Episode(support, labels(1), query, labels(10))
  table = evaluation.table_task_accuracy(learner, episode).numpy()
  gather = evaluation.task_accuracy(learner, episode).numpy()
  assert abs(table[0] - gather[0]) <= 1 / 50 + 1e-6


@pytest.mark.parametrize("model", ["protonet", "matching", "relation", "hallucination",
                                   "snail"])
def test_the_shared_flops_are_the_readouts_row_map(model):
  """The table path maps each query row once (Readout.row_map) and scores it
  against every task: the FLOPs of its task that read the queries and no
  support row are that map's, within 1% on either path (terms the table path
  applies to its scores, terms the readout drops, as ProtoNet's ||f(x)||^2)."""
  learner = benchmark.build(model)
  spec = flops.episode_spec(N, 1, 599, D)
  assert flops.has_readout(learner, spec)

  def row_map(episode):
    state = learner.readout_state(episode.support_x, episode.support_y,
                                  seed=tf.zeros([2], tf.int32))
    return learner.readout(state).row_map(tf.reshape(episode.query_x, [-1, D]))
  mapped = sum(flops.graph_flops(traced(row_map, spec)).values())
  assert mapped <= flops.task_flops(learner, N, 1, 599, D, "table").shared <= 1.01 * mapped
  assert mapped > 1e8
  shared = flops.task_flops(learner, N, 1, 599, D).shared  # gather: predict's own map
  assert mapped <= shared <= 1.01 * mapped


def test_evaluation_limits_share_the_row_map_on_the_table_path():
  learner = benchmark.build("protonet")
  count = flops.task_flops(learner, N, 1, 599, D, "table")
  split = benchmark.synthetic_split(4, 600)          # 2,400 rows
  row = {"method": "table", "tasks": 100, "tasks_per_s": 50.0}
  limits = flops.evaluation_limits(learner, 1, row, 1e11, split)
  assert (limits["task_flops"], limits["shared_flops"]) == (count.total, count.shared)
  own = count.total - count.shared
  assert limits["flops_per_task"] == pytest.approx(own + count.shared * 24 / 2995)
  assert limits["limit_fraction"] == pytest.approx(50.0 * limits["flops_per_task"] / 1e11)
  gather = flops.evaluation_limits(learner, 1, dict(row, method="gather"), 1e11, split)
  assert gather["flops_per_task"] == flops.task_flops(learner, N, 1, 599, D).total


@pytest.mark.parametrize("shots", [1, 5])
def test_protonet_training_step_is_its_map_forward_and_weight_gradient(shots):
  """ProtoNet's meta-training step maps every support and query row of the 12
  tasks through its D x D map (2 (m + q) D^2 per task) and takes that map's
  weight gradient (the same again; the embeddings need no input gradient):
  the step's matrix products. Its training limit follows from that count."""
  m, q, batch = N * shots, N * 15, 12
  counts = flops.train_step_flops(benchmark.build("protonet"), N, shots, 15, D, batch)
  assert counts["MatMul"] == 2 * 2 * (m + q) * D * D * batch
  row = {"batched": 10.0, "xla": 20.0}   # steps/s: the faster counts
  limits = flops.training_limits(benchmark.build("protonet"), shots, row, 1e11)
  assert limits["train_flops_per_task"] == sum(counts.values()) / batch
  assert limits["train_limit_fraction"] == pytest.approx(
      20.0 * batch * limits["train_flops_per_task"] / 1e11)


def test_limit_columns():
  assert flops.limit_columns(500.0, 2e7, 2e10) == {
      "flops_per_task": 2e7, "limit_tasks_per_s": 1000.0, "limit_fraction": 0.5}
  assert flops.limit_columns(None, 2e7, 2e10)["limit_fraction"] is None


def test_matmul_rate_is_a_positive_float_rate():
  rate = flops.matmul_rate(size=256, repeats=2)
  assert 1e8 < rate < 1e14
