"""Hook mode: forward hooks on an MLP's sub-modules that multiply, then add, each site's
vectors (AurA's and ml-act's way); the reference the fused and fold modes are tested against."""
from .state import PatchState
from .strength import ScalesAtStrength


class OutputHook(PatchState):
    """Forward hook: output * s_eff + strength * b of one site."""

    def __init__(self, at, kind):
        self.at, self.kind = at, kind

    def __call__(self, module, args, output):
        return self.at.apply(self.kind, output)


class InputHook(PatchState):
    """Forward pre-hook: input * s_eff + strength * b of one site (`mid`, the input of down /
    fc2; `input`, the MLP's own)."""

    def __init__(self, at, kind):
        self.at, self.kind = at, kind

    def __call__(self, module, args):
        return (self.at.apply(self.kind, args[0]), *args[1:])


def add_hooks(target, strength):
    """Hook every site of one target at `strength`: (its ScalesAtStrength, [(sub-module, hook,
    is a pre-hook)]), what the handle keeps to change the strength and to remove them."""
    at = ScalesAtStrength(target.scales, target.shifts, strength, target.info.path)
    added = []
    for kind in target.kinds():
        sub, reads_input = target.info.site_module(target.module, kind)
        if reads_input:
            hook = InputHook(at, kind)
            sub.register_forward_pre_hook(hook)
        else:
            hook = OutputHook(at, kind)
            sub.register_forward_hook(hook)
        added.append((sub, hook, reads_input))
    return at, added


def remove_hook(module, hook, pre):
    """Remove a forward (pre-)hook by identity: the hook dicts are keyed by an id that a deep
    copy keeps, but a RemovableHandle would hold a weak reference to the original's dict."""
    if pre:
        hooks, extras = module._forward_pre_hooks, ("_forward_pre_hooks_with_kwargs",)
    else:
        hooks, extras = module._forward_hooks, ("_forward_hooks_with_kwargs",
                                                "_forward_hooks_always_called")
    for key in [k for k, h in hooks.items() if h is hook]:
        del hooks[key]
        for name in extras:
            getattr(module, name, {}).pop(key, None)
