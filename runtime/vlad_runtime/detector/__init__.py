"""The detector's normalisers and fusion rules (:mod:`vlad.detector.fusion`, plain numpy).

vlad-runtime ships this file in place of vlad's ``vlad/detector/__init__.py``, which names the torch
detector (resolved lazily) that this distribution does not contain.
"""
