"""The cluster recipes of docs/scaling.md, checked for syntax (``bash -n``, a YAML parser) and
for their options: every ``--llem-*`` flag is a row of the option table, every ``llem merge``
flag exists. They are not run here (no cluster)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.options.table import OPTIONS

DOC = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
_RECIPE = re.compile(
    r"<!-- recipe: (?P<name>[\w.-]+) -->\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S
)


def _recipes() -> dict[str, tuple[str, str]]:
    return {m["name"]: (m["lang"], m["body"]) for m in _RECIPE.finditer(DOC.read_text())}


EXPECTED = {
    "slurm-shards.sbatch": "bash",
    "slurm-merge.sbatch": "bash",
    "slurm-submit.sh": "bash",
    "llem-shards.yaml": "yaml",
    "llem-merge.yaml": "yaml",
    "k8s-run.sh": "bash",
    "llem-shards.yml": "yaml",
}


def test_the_page_has_every_recipe() -> None:
    assert {name: lang for name, (lang, _) in _recipes().items()} == EXPECTED


@pytest.mark.parametrize("name", [n for n, lang in EXPECTED.items() if lang == "bash"])
def test_shell_recipes_parse(name: str, tmp_path: Path) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    script = tmp_path / name
    script.write_text(_recipes()[name][1] + "\n")
    done = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _yaml(name: str) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: YAML not checked")
    return yaml.safe_load(_recipes()[name][1])


def test_the_kubernetes_job_is_indexed_with_a_shared_volume() -> None:
    job = _yaml("llem-shards.yaml")
    spec = job["spec"]
    assert job["kind"] == "Job"
    assert spec["completionMode"] == "Indexed"
    args = " ".join(spec["template"]["spec"]["containers"][0]["args"])
    assert f"--llem-shard=$((JOB_COMPLETION_INDEX + 1))/{spec['completions']}" in args
    assert spec["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]
    merge = _yaml("llem-merge.yaml")
    assert "llem merge" in " ".join(merge["spec"]["template"]["spec"]["containers"][0]["args"])


def test_the_github_workflow_has_a_matrix_and_a_merge_job() -> None:
    workflow = _yaml("llem-shards.yml")
    jobs = workflow["jobs"]
    shards = jobs["shard"]["strategy"]["matrix"]["shard"]
    runs = " ".join(step.get("run", "") for step in jobs["shard"]["steps"])
    assert f"--llem-shard=${{{{ matrix.shard }}}}/{len(shards)}" in runs
    assert jobs["merge"]["needs"] == "shard"
    assert jobs["merge"]["if"] == "always()"
    assert any("llem merge" in step.get("run", "") for step in jobs["merge"]["steps"])


def test_the_slurm_array_gives_one_shard_per_task_and_merges_after_any() -> None:
    recipes = _recipes()
    shards = recipes["slurm-shards.sbatch"][1]
    assert '--llem-shard="$SHARD/$SLURM_ARRAY_TASK_COUNT"' in shards
    assert "SHARD=$((SLURM_ARRAY_TASK_ID + 1))" in shards
    assert "--llem-gpus=" in shards
    assert '--dependency="afterany:' in recipes["slurm-submit.sh"][1]
    assert "llem merge" in recipes["slurm-merge.sbatch"][1]


def test_every_flag_the_recipes_use_exists() -> None:
    from pytest_llem.cli import build_parser

    text = "\n".join(body for _, body in _recipes().values())
    flags = set(re.findall(r"--llem-[a-z-]+", text))
    assert flags >= {"--llem-shard", "--llem-gpus", "--llem-report-dir", "--llem-storage"}
    assert flags <= {row.flag for row in OPTIONS}
    parser = build_parser()
    merge = parser.parse_args(["merge", "a.json", "-o", "m.json", "--allow-partial"])
    assert merge.allow_partial
