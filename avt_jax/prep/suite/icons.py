"""Pictures: the same freedesktop icon names drawn by different designers (Debian icon themes).

Sources (`apt-get install adwaita-icon-theme tango-icon-theme oxygen-icon-theme
elementary-xfce-icon-theme`), all shipping PNG renderings of the freedesktop.org icon naming
specification (so a name such as `printer` is a printer in every theme, in each designer's style):

* `Adwaita` (GNOME, `adwaita-icon-theme`, LGPL-3 / CC-BY-SA-3.0; its full-colour `legacy` icons),
* `Tango` (Tango Desktop Project, `tango-icon-theme`, public domain; PNGs up to 32 px),
* `oxygen` (KDE, `oxygen-icon-theme`, LGPL-3),
* `elementary-xfce` (elementary / Xfce, `elementary-xfce-icon-theme`, GPL-2+).

A split that shows some themes in training and another in test is disjoint by picture design. Our
design.
"""

import functools
import os
import re

import numpy as np

ICONS_DIR = '/usr/share/icons'
THEMES = {
    'Adwaita': 'adwaita-icon-theme',
    'Tango': 'tango-icon-theme',
    'oxygen': 'oxygen-icon-theme',
    'elementary-xfce': 'elementary-xfce-icon-theme',
}
PICTURE_SIZE = 64  # icons are resampled to this side before rendering
TARGET_SIZE = 64  # prefer the rendering closest to this, larger first


def _size_of(path: str) -> int:
  """The pixel size a theme folder path names (`.../48x48/...` or `.../48/...`), 0 if none."""
  for part in reversed(path.split(os.sep)):
    match = re.fullmatch(r'(\d+)(?:x\d+)?(?:@\d+x)?', part)
    if match:
      return int(match.group(1))
  return 0


@functools.lru_cache(maxsize=None)
def _index(theme: str) -> dict[str, list[tuple[int, str]]]:
  """Icon name -> [(pixel size, path)] of the full-colour PNGs of an installed theme."""
  root = os.path.join(ICONS_DIR, theme)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Icon theme {theme!r} not found in {ICONS_DIR}: '
                            f'`apt-get install {THEMES[theme]}`.')
  index = {}
  for folder, _, files in os.walk(root, followlinks=True):
    if 'symbolic' in folder:
      continue
    size = _size_of(os.path.relpath(folder, root))
    for f in files:
      if f.endswith('.png'):
        index.setdefault(f[:-4], []).append((size, os.path.join(folder, f)))
  return index


def icon_path(theme: str, name: str) -> str:
  """The full-colour PNG of icon `name` in `theme` closest in size to TARGET_SIZE (larger preferred).

  Raises:
    FileNotFoundError: the theme is not installed (the message names its package), or lacks `name`.
  """
  found = _index(theme).get(name)
  if not found:
    raise FileNotFoundError(f'{os.path.join(ICONS_DIR, theme)}: no PNG icon named {name!r}.')
  return min((size < TARGET_SIZE, abs(size - TARGET_SIZE), path) for size, path in found)[2]


def load_icon(theme: str, name: str) -> np.ndarray:
  """[PICTURE_SIZE, PICTURE_SIZE, 4] float32 RGBA in 0..1 (straight, not premultiplied, alpha)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(icon_path(theme, name)) as image:
    image = image.convert('RGBA').resize((PICTURE_SIZE, PICTURE_SIZE), Image.LANCZOS)
    return np.asarray(image, np.float32) / 255.0
