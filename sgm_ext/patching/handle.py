"""PatchHandle, what `patch` returns: a patched model's strength and the undo of its patch, kept
as plain data; and the marker naming a model's (and each patched MLP's) handle."""
from typing import Union

import torch

from .fold import NEEDS_ONE_STRENGTH, apply_fold, fold_plan, undo_fold
from .fused import fused_forward
from .hooks import add_hooks, remove_hook
from .state import PatchState
from .strength import Strength

HANDLE_ATTR = "_sgm_ext_patch"  # on the patched model (root) and on every patched MLP


def handle_of(module):
    """The PatchHandle marked on a module, or None."""
    return module.__dict__.get(HANDLE_ATTR)


def _set_marker(module, handle):
    module.__dict__[HANDLE_ATTR] = handle


def _clear_marker(module, handle):
    if module.__dict__.get(HANDLE_ATTR) is handle:
        del module.__dict__[HANDLE_ATTR]


class PatchHandle(PatchState):
    """A patched model: change the strength, or remove the patch (also as a context manager).

    copy.deepcopy of the patched model gives the copy a handle of its own (find it with
    `sgm_ext.unpatch(copy)`); a patched model cannot be pickled (remove the patch first)."""

    def __init__(self, model, root, targets, mode, strength: Strength):
        self.model, self.mode = model, mode
        self.sites = tuple(t.info.site(k) for t in targets for k in t.kinds())
        self._root, self._targets, self._strength = root, targets, strength
        # What remove() undoes, as data (a deep copy maps the modules onto the copy's):
        self._swaps = []  # (module, attribute, had an instance value, that value)
        self._hooks = []  # (module, hook object, is a pre-hook)
        self._marked = []  # modules carrying the marker
        self._scaled = []  # what holds the strength: Fused forwards, hooks' ScalesAtStrength
        self._folded = None  # fold mode: [(tensor, dim, index, saved slice)]
        self.active = False

    @property
    def strength(self):
        """The float strength, or the per-sequence one (float32 [B])."""
        return self._strength.value

    def apply(self):
        """Patch the model (patch() checked everything first: this does not fail)."""
        if self.mode == "fold":
            self._folded = apply_fold(fold_plan(self._targets, self._strength))
        for t in self._targets:
            if self.mode == "fused":
                self._swap_forward(t)
            elif self.mode == "hook":
                at, hooks = add_hooks(t, self._strength)
                self._scaled.append(at)
                self._hooks += hooks
            _set_marker(t.module, self)
            self._marked.append(t.module)
        _set_marker(self._root, self)
        self.active = True

    def _swap_forward(self, target):
        m = target.module
        # accelerate's hooks replace `forward` with a wrapper that calls `_old_forward`: swap
        # that, so the hook (device placement, offload) keeps running around the fused forward.
        attr = "_old_forward" if hasattr(m, "_hf_hook") and "_old_forward" in m.__dict__ \
            else "forward"
        had = attr in m.__dict__
        previous = m.__dict__.get(attr)
        original = previous if had else type(m).forward.__get__(m)
        fused = fused_forward(target, self._strength, original)
        self._scaled.append(fused)
        self._swaps.append((m, attr, had, previous))
        m.__dict__[attr] = fused

    def set_strength(self, strength: Union[float, torch.Tensor]) -> "PatchHandle":
        """A float in [0, 1], or a tensor [B] / [B, 1]: one strength per sequence of the next
        batches (fused and hook modes). Fold mode re-folds the weights (a float only)."""
        if not self.active:
            raise RuntimeError("this patch has been removed")
        strength = Strength(strength)
        if self.mode == "fold":
            strength.require_uniform(NEEDS_ONE_STRENGTH)
            # planned from the unfolded weights (a mid shift enters the down bias through
            # W_down); the Linears were checked when the model was patched
            undo_fold(self._folded)
            self._folded = apply_fold(fold_plan(self._targets, strength))
        self._strength = strength
        for s in self._scaled:
            s.set_strength(strength)
        return self

    def remove(self) -> None:
        """Restore the model exactly: original forwards, no hooks, the saved weight slices."""
        if not self.active:
            return
        while self._marked:
            _clear_marker(self._marked.pop(), self)
        while self._hooks:
            remove_hook(*self._hooks.pop())
        while self._swaps:
            m, attr, had, previous = self._swaps.pop()
            if had:
                m.__dict__[attr] = previous
            else:
                m.__dict__.pop(attr, None)
        if self._folded is not None:
            undo_fold(self._folded)
            self._folded = None
        _clear_marker(self._root, self)
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        state = "active" if self.active else "removed"
        return (f"PatchHandle({self.mode}, {len(self.sites)} sites, "
                f"strength={self._strength}, {state})")
