"""`sgm-ext sites`: list a model's sites, the names scale files use."""
from ..app.loading import load_model
from ..evaluation.report import site_report
from ..profile.pooling import site_table


def add_sites(sub):
    p = sub.add_parser("sites", help="list a model's sites (the names scale files use)",
                       description="Every site of the model's MLPs: its name (a key of a scale "
                       "file), the MLP class, the kind, how many scales it takes, and whether "
                       "the profiler can observe it.")
    p.add_argument("--model", required=True, help="model directory (Hugging Face format)")
    p.set_defaults(func=run_sites)


def run_sites(args):
    model, _ = load_model(args.model, "cpu", "auto")
    print(site_report(site_table(model)))
    return 0
