"""`tp-plugin launch`: unchanged scripts run split, and nothing happens in a process that does not ask for it.

The real clients run as their users run them, against the same command without the launcher (the unsplit model
under DDP on 2 ranks, the same global batch as TP=2 x DP=2 on 4): a plain `Trainer` script written like
transformers' run_clm.py (DDP and `--deepspeed` ZeRO-2), a plain TRL `SFTTrainer` given the model as a path, and
TRL's own `trl sft` command. Losses: rel 1e-4 (fp32; they differ only in the order of sums, ~1e-6 seen); each
rank holds half the model; the saved checkpoint is ordinary and is the unsplit run's (2e-5 after 3 AdamW steps of
lr 1e-3: see tests/test_accelerate_launch.py). The plain Accelerate loop in the usual order, under every CPU
config, is in tests/test_accelerate_launch.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tp_plugin import launch

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
REL = 1e-4


def _env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", **extra}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    for name in ("ACCELERATE_USE_CPU", launch.ENV_AUTO, "TP_PLUGIN_TP_SIZE"):
        env.pop(name, None)
    return env


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _probe(code: str, **env) -> str:
    return _run([sys.executable, "-c", code], **env).stdout.strip()


# ---- the start-up hook ------------------------------------------------------------------------------------------

def test_print_env_and_the_hook_only_where_asked(tmp_path):
    printed = _run([str(BIN / "tp-plugin"), "launch", "--tp", "2", "--sequence-parallel", "--print-env"]).stdout
    assert "export TP_PLUGIN_AUTO=1" in printed and "export TP_PLUGIN_TP_SIZE=2" in printed
    assert "export TP_PLUGIN_SEQUENCE_PARALLEL=1" in printed and str(launch.SITE_DIR) in printed
    # under the launcher: nothing of tp_plugin until transformers is imported, then activated
    code = ("import sys; before = 'tp_plugin' in sys.modules; import transformers, tp_plugin.launch as l\n"
            "print(before, l._active)")
    launched = _run([str(BIN / "tp-plugin"), "launch", "--", "python", "-c", code]).stdout.split()
    assert launched == ["False", "True"], launched
    # the site directory on the path without TP_PLUGIN_AUTO: nothing (the no-side-effect rule)
    assert _probe(code, PYTHONPATH=str(launch.SITE_DIR)).split() == ["False", "False"]
    # a sitecustomize the launcher's shadows still runs
    other = tmp_path / "site"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['CHAINED'] = 'yes'\n")
    chained = _run([str(BIN / "tp-plugin"), "launch", "--", "python", "-c", "import os; print(os.environ['CHAINED'])"],
                   PYTHONPATH=str(other)).stdout.strip()
    assert chained == "yes"


def test_launch_without_a_command_says_how():
    proc = subprocess.run([str(BIN / "tp-plugin"), "launch", "--tp", "2"], env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "needs a command after `--`" in proc.stderr, proc.stderr


# ---- real clients, unchanged -----------------------------------------------------------------------------------

def _reports(prefix: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(prefix.parent.glob(prefix.name + ".*"))]


def _same_checkpoint(a: Path, b: Path) -> float:
    from transformers import AutoModelForCausalLM

    x, y = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (a, b))
    return max((p - q).abs().max().item() for p, q in zip(x.parameters(), y.parameters()))


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= REL * abs(y) for x, y in zip(a, b))


def _torchrun(nproc: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc)]


def _split(nproc: int) -> list[str]:
    return [str(BIN / "tp-plugin"), "launch", "--tp", "2", "--", *_torchrun(nproc)]


def test_plain_trainer_script_runs_split(tiny_model, tmp_path):
    """examples/train_clm.py (plain `Trainer`), DDP and `--deepspeed` ZeRO-2 as the data-parallel axis."""
    def clm(out: Path, *extra: str) -> list[str]:
        return ["examples/train_clm.py", "--model_name_or_path", str(tiny_model), "--train_file",
                "examples/data/corpus.txt", "--max_steps", "3", "--per_device_train_batch_size", "2",
                "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none", "--ddp_backend", "gloo",
                "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(out), "--report_file",
                str(out) + ".json", *extra]

    _run(_torchrun(2) + clm(tmp_path / "ref", "--use_cpu"))
    _run(_split(4) + clm(tmp_path / "ddp", "--use_cpu"))
    _run(_split(4) + clm(tmp_path / "zero2", "--deepspeed", "configs/accelerate/ds_zero2_tp2.json"))
    ref = _reports(tmp_path / "ref.json")[0]
    for run in ("ddp", "zero2"):
        reports = _reports(tmp_path / f"{run}.json")
        assert len(reports) == 4, reports
        for r in reports:
            assert _close(r["losses"], ref["losses"]), (run, r["losses"], ref["losses"])
            assert 0.49 < r["params"] / ref["params"] < 0.51, (run, r["params"], ref["params"])
            assert r["trainer"][:2] == ["Trainer", "TPTrainerMixin"], r["trainer"]  # the mixin in front
        assert _same_checkpoint(tmp_path / run, tmp_path / "ref") <= 2e-5


def test_plain_trl_sft_trainer_with_a_model_path_runs_split(tiny_model, tmp_path):
    """`SFTTrainer(model="path")` (TRL loads the model), and TRL's `trl sft` command on a local jsonl file."""
    script = ["tests/scripts/sft_from_path.py", str(tiny_model), "examples/data/corpus.txt"]
    _run(_torchrun(2) + script + [str(tmp_path / "ref"), str(tmp_path / "ref.json")])
    _run(_split(4) + script + [str(tmp_path / "split"), str(tmp_path / "split.json")])
    ref = _reports(tmp_path / "ref.json")[0]
    for r in _reports(tmp_path / "split.json"):
        for key in ("loss", "num_tokens", "entropy"):  # num_tokens: counted per replica, not per process
            assert _close([h[key] for h in r["history"]], [h[key] for h in ref["history"]]), (key, r, ref)
        assert 0.49 < r["params"] / ref["params"] < 0.51, (r["params"], ref["params"])
    assert _same_checkpoint(tmp_path / "split", tmp_path / "ref") <= 2e-5

    data = tmp_path / "data"
    data.mkdir()
    lines = [line for line in (REPO / "examples/data/corpus.txt").read_text().splitlines() if line.strip()][:16]
    (data / "train.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    cli = _run([str(BIN / "tp-plugin"), "launch", "--tp", "2", "--", str(BIN / "trl"), "sft", "--multi_gpu",
                "--num_processes", "2", "--main_process_port", "0", "--model_name_or_path", str(tiny_model),
                "--dataset_name", str(data), "--output_dir", str(tmp_path / "cli"), "--max_steps", "2",
                "--per_device_train_batch_size", "2", "--report_to", "none", "--bf16", "False", "--use_cpu", "True",
                "--max_length", "32", "--save_strategy", "no", "--dataset_text_field", "text", "--logging_steps", "1"])
    assert "'num_tokens': '64'" in cli.stdout + cli.stderr  # one replica of 2 x 32 tokens: both ranks one model
    assert _same_checkpoint(tmp_path / "cli", tiny_model) > 0  # trained, saved, loads in plain transformers


def test_uninstall_undoes_the_zero_code_patches():
    code = ("import transformers, transformers.modeling_utils as m, tp_plugin.integrations as i\n"
            "from transformers import Trainer\n"
            "f = lambda: hasattr(m.PreTrainedModel.__dict__['from_pretrained'].__func__, '__wrapped__')\n"
            "g = lambda: '__new__' in vars(Trainer)\n"
            "before = (f(), g()); i.uninstall(); print(*before, f(), g())")
    out = _run([str(BIN / "tp-plugin"), "launch", "--", "python", "-c", code]).stdout.split()
    assert out == ["True", "True", "False", "False"], out
