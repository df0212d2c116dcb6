"""TF Serving REST bodies, gRPC request protos and a loopback REST stub.

The REST API (tensorflow_serving/g3doc/api_rest.md) as it applies to an
exported classifier:

  POST /v1/models/<name>[/versions/<v>]:predict
    row:      {"signature_name": "serving_default", "instances": [[...D floats...], ...]}
              -> {"predictions": [{"probabilities": [...], "classes": "cat",
                                   "logits": [...]}, ...]}
    columnar: {"signature_name": "adapt_and_predict", "inputs": {"support_embeddings":
              [[...]], "support_labels": [...], "query_embeddings": [[...]]}}
              -> {"outputs": {"logits": [[...]], ...}}
    images:   {"instances": [{"b64": "<base64 PNG>"}, ...]}
  POST /v1/models/<name>:classify
    {"signature_name": "classify", "examples": [{"embedding": [...D floats...]}]}
    -> {"result": [[["cat", 0.7], ["dog", 0.2], ["owl", 0.1]], ...]}

`request_inputs` decodes a body the way the server does and checks it
against a signature's input names, dtypes and shapes; `predict_request` and
`classification_request` build the equivalent gRPC protos
(`tensorflow_serving.apis`, installed with --no-deps). `LoopbackServer` maps
REST calls onto `tf.saved_model.load(...).signatures` for tests and demos on
machines without `tensorflow_model_server` (it is not the real server).
"""

import base64
import http.server
import json
import os
import re
import threading
from typing import Dict, List

import numpy as np
import tensorflow as tf


def error_text(exc) -> str:
  """One line for a client: an op error's own message, without TF's "Graph
  execution error" header, the stack of where the op was built and the node
  names."""
  message = (getattr(exc, "message", None) or str(exc)).strip()
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  useful = [l for l in lines if not l.startswith(
      ("Graph execution error", "Detected at node", "File ", "Traceback", "[[{{node"))]
  if not isinstance(exc, tf.errors.OpError):
    useful = lines
  return (useful[-1 if isinstance(exc, tf.errors.OpError) else 0] if useful
          else type(exc).__name__)[:500]


class RequestError(ValueError):
  """A REST body that does not fit the signature (the server answers 400)."""


def _decode_b64(value):
  if isinstance(value, dict):
    if set(value) != {"b64"}:
      raise RequestError(f"a binary value must be {{\"b64\": ...}}, got keys {sorted(value)}")
    try:
      return base64.b64decode(value["b64"], validate=True)
    except (ValueError, TypeError) as exc:
      raise RequestError(f"invalid base64 in a b64 value: {exc}") from None
  if isinstance(value, list):
    return [_decode_b64(v) for v in value]
  return value


def _as_array(name, values, spec: tf.TensorSpec):
  """JSON values -> numpy array of the spec's dtype, checked against its shape."""
  dtype = spec.dtype
  try:
    if dtype == tf.string:
      decoded = _decode_b64(values)
      array = np.asarray(decoded, dtype=object)
      if array.size and not all(isinstance(v, (bytes, str)) for v in array.reshape(-1)):
        raise RequestError(f"input {name!r} holds {dtype.name} values: send strings "
                           "or {\"b64\": ...}")
      array = np.vectorize(lambda v: v.encode() if isinstance(v, str) else v,
                           otypes=[object])(array) if array.size else array
    else:
      array = np.asarray(values)
      if array.dtype == object or array.dtype.kind not in "biuf":
        raise RequestError(f"input {name!r} must be a (nested) list of numbers of "
                           f"equal lengths ({dtype.name})")
      if dtype.is_integer and array.dtype.kind == "f" and not np.all(array == np.round(array)):
        raise RequestError(f"input {name!r} must hold integers ({dtype.name})")
      array = array.astype(dtype.as_numpy_dtype)
  except (ValueError, TypeError) as exc:
    if isinstance(exc, RequestError):
      raise
    raise RequestError(f"input {name!r}: {exc}") from None
  expected = spec.shape
  if array.ndim != expected.rank or not expected.is_compatible_with(array.shape):
    shape = [-1 if d is None else d for d in expected.as_list()]
    raise RequestError(f"input {name!r} has shape {list(array.shape)}, the signature "
                       f"expects {shape} ({dtype.name})")
  if expected.rank and expected[0] is None and array.shape[0] == 0:
    raise RequestError(f"input {name!r} is an empty batch: send at least one")
  return array


def input_specs(signature) -> Dict[str, tf.TensorSpec]:
  """{input name: TensorSpec} of a loaded signature (a ConcreteFunction)."""
  return dict(signature.structured_input_signature[1])


def request_inputs(body: dict, signature) -> Dict[str, np.ndarray]:
  """Decodes a :predict body (row "instances" or columnar "inputs")."""
  specs = input_specs(signature)
  if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
    raise RequestError('the body must be an object with exactly one of "instances" '
                       '(row format) or "inputs" (columnar format)')
  if "instances" in body:
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
      raise RequestError('"instances" must be a non-empty list')
    named = all(isinstance(i, dict) and "b64" not in i for i in instances)
    if len(specs) == 1 and not named:
      (name,) = specs
      columns = {name: instances}
    else:
      if not named:
        raise RequestError(f"with inputs {sorted(specs)} every instance must be an "
                           "object keyed by input name")
      columns = {}
      for index, instance in enumerate(instances):
        if set(instance) != set(specs):
          raise RequestError(f"instance {index} has inputs {sorted(instance)}, the "
                             f"signature takes {sorted(specs)}")
        for name in specs:
          columns.setdefault(name, []).append(instance[name])
  else:
    inputs = body["inputs"]
    if isinstance(inputs, dict) and set(inputs) <= set(specs) and inputs:
      columns = inputs
    elif len(specs) == 1:
      columns = {next(iter(specs)): inputs}
    else:
      raise RequestError(f'"inputs" must be an object with keys {sorted(specs)}')
    if set(columns) != set(specs):
      raise RequestError(f"inputs {sorted(columns)} given, the signature takes "
                         f"{sorted(specs)}")
  return {name: _as_array(name, columns[name], specs[name]) for name in specs}


def _jsonable(array: np.ndarray):
  if array.dtype == object:
    return np.vectorize(lambda v: v.decode("utf-8", "replace"), otypes=[object])(
        array).tolist() if array.size else array.tolist()
  return array.tolist()


def predict_response(outputs: Dict[str, np.ndarray], row_format: bool) -> dict:
  """Signature outputs -> the server's {"predictions": ...} / {"outputs": ...}."""
  outputs = {k: np.asarray(v) for k, v in outputs.items()}
  if not row_format:
    if len(outputs) == 1:
      return {"outputs": _jsonable(next(iter(outputs.values())))}
    return {"outputs": {k: _jsonable(v) for k, v in outputs.items()}}
  batch = {int(v.shape[0]) for v in outputs.values()}
  if len(batch) != 1:
    raise RequestError("outputs have different batch sizes; use the columnar "
                       '"inputs" format for this signature')
  if len(outputs) == 1:
    return {"predictions": _jsonable(next(iter(outputs.values())))}
  columns = {k: _jsonable(v) for k, v in outputs.items()}
  return {"predictions": [{k: columns[k][i] for k in sorted(columns)}
                          for i in range(batch.pop())]}


def make_example(features: dict) -> tf.train.Example:
  """{"embedding": [floats]} (or ints / strings / {"b64"}) -> tf.train.Example."""
  example = tf.train.Example()
  for key, value in features.items():
    values = value if isinstance(value, list) else [value]
    values = _decode_b64(values)
    feature = example.features.feature[key]
    if all(isinstance(v, (bytes, str)) for v in values):
      feature.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
      feature.int64_list.value.extend(values)
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
      feature.float_list.value.extend(float(v) for v in values)
    else:
      raise RequestError(f"feature {key!r}: values must be all numbers or all strings")
  return example


def examples_from_body(body: dict) -> List[tf.train.Example]:
  """The tf.Examples of a :classify body ("context" features merged in)."""
  examples = body.get("examples") if isinstance(body, dict) else None
  if not isinstance(examples, list) or not examples:
    raise RequestError('a :classify body needs a non-empty "examples" list')
  context = body.get("context", {})
  return [make_example(dict(context, **features)) for features in examples]


def classify_response(outputs: Dict[str, np.ndarray]) -> dict:
  classes = _jsonable(np.asarray(outputs["classes"]))
  scores = np.asarray(outputs["scores"]).tolist()
  return {"result": [[[c, s] for c, s in zip(row_c, row_s)]
                     for row_c, row_s in zip(classes, scores)]}


# -- gRPC protos (tensorflow_serving.apis) -------------------------------------
def predict_request(body: dict, signature, model_name: str, version: int = 0):
  """The `PredictRequest` equivalent to a REST :predict body."""
  from tensorflow_serving.apis import predict_pb2  # pylint: disable=g-import-not-at-top
  specs = input_specs(signature)
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model_name
  request.model_spec.signature_name = body.get("signature_name", "serving_default")
  if version:
    request.model_spec.version.value = version
  for name, array in request_inputs(body, signature).items():
    request.inputs[name].CopyFrom(tf.make_tensor_proto(array, dtype=specs[name].dtype))
  return request


def classification_request(body: dict, model_name: str, version: int = 0):
  """The `ClassificationRequest` equivalent to a REST :classify body."""
  from tensorflow_serving.apis import classification_pb2  # pylint: disable=g-import-not-at-top
  request = classification_pb2.ClassificationRequest()
  request.model_spec.name = model_name
  request.model_spec.signature_name = body.get("signature_name", "serving_default")
  if version:
    request.model_spec.version.value = version
  for example in examples_from_body(body):
    request.input.example_list.examples.add().CopyFrom(example)
  return request


# -- loopback REST stub -------------------------------------------------------------
_ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?"
                    r"(?::(?P<verb>predict|classify))?$")


class LoopbackServer:
  """A REST stand-in for tensorflow_model_server over one model base path.

  Serves the highest version under `model_base_path` as `model_name` on
  127.0.0.1:`port` (0 = any free port): :predict (row and columnar),
  :classify and model status. For tests and demos only.
  """

  def __init__(self, model_base_path: str, model_name: str, port: int = 0):
    versions = sorted(int(v) for v in os.listdir(model_base_path) if v.isdigit())
    if not versions:
      raise FileNotFoundError(f"{model_base_path}: no numeric version directory")
    self.model_name, self.version = model_name, versions[-1]
    self.model = tf.saved_model.load(os.path.join(model_base_path, str(self.version)))
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):  # quiet
        pass

      def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def do_GET(self):  # pylint: disable=invalid-name
        match = _ROUTE.match(self.path)
        if not match or match["verb"] or match["name"] != server.model_name:
          return self._reply(404, {"error": f"unknown path {self.path}"})
        return self._reply(200, {"model_version_status": [{
            "version": str(server.version), "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]})

      def do_POST(self):  # pylint: disable=invalid-name
        match = _ROUTE.match(self.path)
        if not match or not match["verb"] or match["name"] != server.model_name:
          return self._reply(404, {"error": f"unknown path {self.path}"})
        if match["version"] and int(match["version"]) != server.version:
          return self._reply(404, {"error": f"version {match['version']} not loaded"})
        try:
          body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
          return self._reply(200, server.handle(match["verb"], body))
        except (RequestError, ValueError, KeyError, TypeError, tf.errors.OpError) as exc:
          return self._reply(400, {"error": error_text(exc)})

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    self.port = self.httpd.server_address[1]
    self._thread = None

  @property
  def url(self):
    return f"http://127.0.0.1:{self.port}/v1/models/{self.model_name}"

  def handle(self, verb: str, body: dict) -> dict:
    if verb == "classify":
      name = body.get("signature_name", "serving_default")
      signature = self._signature(name)
      serialized = [e.SerializeToString() for e in examples_from_body(body)]
      outputs = signature(inputs=tf.constant(serialized, tf.string))
      return classify_response({k: v.numpy() for k, v in outputs.items()})
    signature = self._signature(body.get("signature_name", "serving_default"))
    inputs = request_inputs(body, signature)
    specs = input_specs(signature)
    outputs = signature(**{k: tf.constant(v, specs[k].dtype) for k, v in inputs.items()})
    return predict_response({k: v.numpy() for k, v in outputs.items()},
                            row_format="instances" in body)

  def _signature(self, name):
    if name not in self.model.signatures:
      raise RequestError(f"serving signature name {name!r} not found in the model "
                         f"(has {sorted(self.model.signatures)})")
    return self.model.signatures[name]

  def start(self):
    self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self._thread.start()
    return self

  def stop(self):
    self.httpd.shutdown()
    self.httpd.server_close()
