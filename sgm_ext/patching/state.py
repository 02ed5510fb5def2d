"""PatchState: the base of every object a patch leaves in a model (handle, fused forward,
scales at a strength, hooks): copied whole by copy.deepcopy, refused by pickle."""
import copy

NO_PICKLE = ("a model patched by sgm-ext cannot be pickled (pickle.dumps, torch.save(model)): "
             "remove the patch first (handle.remove() / sgm_ext.unpatch(model)), save, and "
             "patch again after loading; torch.save(model.state_dict()) works while patched")


class PatchState:
    """copy.deepcopy copies it attribute by attribute through deepcopy's memo, so the copy refers
    to the copied modules and tensors; pickling it raises, naming what to do instead."""

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def __reduce_ex__(self, protocol):
        raise TypeError(NO_PICKLE)
