"""rlhf-engine: RLHF training (SFT, reward model, PPO/GRPO/RLOO) with fused Triton kernels and a paged KV cache."""

__version__ = "0.1.0"


def _kernels_of_a_source_tree() -> None:
    """An install puts the top-level ``kernels/`` inside this package (setup.py's ``package_dir``). A source
    checkout run uninstalled, with ``_C`` built in place (``make gpu-check`` with the interpreter it is given),
    has it beside this package instead: ``rlhf_engine.kernels`` is then that folder, also where an editable
    install of another checkout would map the name to its own."""
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    folder = os.path.join(root, "kernels")
    init = os.path.join(folder, "__init__.py")
    # a checkout of this repository (csrc/ beside it), never site-packages' own `kernels` (another project's)
    if not (os.path.isfile(init) and os.path.isdir(os.path.join(root, "csrc"))):
        return
    spec = importlib.util.find_spec(f"{__name__}.kernels")
    if spec is not None and os.path.dirname(os.path.abspath(spec.origin or "")) in (os.path.join(here, "kernels"),
                                                                                     folder):
        return  # installed with this package, or an editable install of this checkout
    spec = importlib.util.spec_from_file_location(f"{__name__}.kernels", init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    sys.modules[__name__].kernels = module  # what an import of the subpackage sets


_kernels_of_a_source_tree()
