"""Hub publishing: the model card, remote code next to the weights, and `push_to_hub` against a local stand-in
of the Hub (the real one is not reachable here) that records what it receives."""

import base64
import json
import os
import subprocess
import sys
import sysconfig
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import EOI, EOT, IMG, SOI, SOT, tiny_config
from helpers_distributed import SCENARIOS, DocumentDataset, collate
from huggingface_hub import EvalResult, ModelCard
from safetensors.torch import load as load_safetensors

from modeling_lcl import LCLForPreTraining
from modeling_lcl.hub_lcl import AUTO_MAP, add_remote_code, build_model_card, push_folder_to_hub
from modeling_lcl.trainer_lcl import LCLTrainer, LCLTrainingArguments
from processing import LCLImageProcessor, LCLProcessor, build_test_tokenizer

REPO = Path(__file__).resolve().parents[1]
CODE_FILES = {"modeling_lcl.py", "configuration_lcl.py", "loss_lcl.py", "packing_lcl.py"}


def tiny_processor_and_model():
    tokenizer = build_test_tokenizer()
    config = tiny_config()
    processor = LCLProcessor(
        image_processor=LCLImageProcessor(size=16, crop_size=16),
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        max_length=config.text_config.max_position_embeddings,
    )
    text_config = {**config.text_config.to_dict(), "vocab_size": len(tokenizer)}
    torch.manual_seed(0)
    model = LCLForPreTraining(tiny_config(text_config=text_config, **processor.special_token_ids()))
    return processor, model


def trained_trainer(output_dir, **arg_overrides) -> LCLTrainer:
    """Two steps on hand-built documents, their special ids mapped to the test tokenizer's."""
    processor, model = tiny_processor_and_model()
    dataset = DocumentDataset(SCENARIOS["uneven"], num_image_tokens=model.config.num_image_tokens)
    ids = processor.special_token_ids()
    remap = {IMG: ids["image_token_id"], SOI: ids["image_start_token_id"], EOI: ids["image_end_token_id"],
             SOT: ids["bos_token_id"], EOT: ids["eos_token_id"]}
    for sample in dataset.samples:
        sample["input_ids"] = [remap.get(token, token) for token in sample["input_ids"]]
    args = LCLTrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=3, max_steps=2, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, **arg_overrides,
    )
    trainer = LCLTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate, processing_class=processor)
    trainer.train()
    return trainer


# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------


def test_model_card_metadata_holds_library_tags_datasets_license_losses_and_results():
    result = EvalResult(task_type="zero-shot-image-classification", dataset_type="sklearn-digits",
                        dataset_name="digits, 500 held out", metric_type="accuracy", metric_value=0.91,
                        metric_name="zero-shot accuracy")
    card = build_model_card(
        "lcl-tiny", tiny_config(), datasets=["mmc4"], tags=["digits"],
        training_metrics={"loss": 1.5, "loss_contrastive": 2.0, "loss_generation": 1.3},
        eval_results=[result], hyperparameters={"learning_rate": 1e-3},
    )
    reloaded = ModelCard(str(card))  # what the Hub parses from README.md
    data = reloaded.data
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    assert {"lcl", "digits"} <= set(data.tags) and data.datasets == ["mmc4"]
    assert data.training_metrics == {"loss": 1.5, "loss_contrastive": 2.0, "loss_generation": 1.3}
    assert data.eval_results[0].metric_value == 0.91 and data.model_name == "lcl-tiny"
    assert "| zero-shot accuracy (digits, 500 held out) | 0.91 |" in reloaded.text
    assert "trust_remote_code=True" in reloaded.text


def test_trainer_model_card_reports_the_runs_final_losses(tmp_path):
    trainer = trained_trainer(tmp_path)
    card = trainer.create_model_card(model_name="tiny", datasets="mmc4")
    last = [entry for entry in trainer.state.log_history if "loss_contrastive" in entry][-1]
    assert card.data.training_metrics["loss_contrastive"] == pytest.approx(last["loss_contrastive"])
    assert card.data.training_metrics["loss_generation"] == pytest.approx(last["loss_generation"])
    assert ModelCard.load(tmp_path / "README.md").data.datasets == ["mmc4"]


# ---------------------------------------------------------------------------------------------
# Remote code
# ---------------------------------------------------------------------------------------------


def test_saved_folder_carries_weights_processor_code_and_auto_map(tmp_path):
    trainer = trained_trainer(tmp_path / "run")
    trainer.save_model(str(tmp_path / "saved"))
    files = set(os.listdir(tmp_path / "saved"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} | CODE_FILES <= files
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_folder_with_auto_map_still_loads_the_installed_package_without_trust_remote_code(tmp_path):
    from transformers import AutoModel

    trained_trainer(tmp_path).save_model(str(tmp_path / "saved"))
    model = AutoModel.from_pretrained(str(tmp_path / "saved"))
    assert type(model).__module__ == "modeling_lcl.modeling_lcl"  # the installed code, no remote code involved


def test_add_remote_code_needs_a_saved_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="save the model"):
        add_remote_code(tmp_path)


REMOTE_LOAD_SCRIPT = r"""
import importlib.util, sys
sys.path.append(SITE_PACKAGES)  # torch and transformers, without the site hooks (.pth) of the editable install
for name in ("modeling_lcl", "processing", "examples"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable: the test would prove nothing"
import torch
from transformers import AutoModel, AutoModelForPreTraining
model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True).eval()
assert type(model).__name__ == "LCLModel" and type(model).__module__.startswith("transformers_modules"), type(model)
pretraining = AutoModelForPreTraining.from_pretrained(FOLDER, trust_remote_code=True)
assert type(pretraining).__name__ == "LCLForPreTraining"
expected = torch.load(FOLDER + "/expected.pt")
with torch.no_grad():
    features = model.get_image_features(expected["pixel_values"])
torch.testing.assert_close(features, expected["features"], rtol=1e-5, atol=1e-6)
print("REMOTE_CODE_OK")
"""


def test_remote_code_loads_in_an_environment_without_this_package(tmp_path):
    folder = tmp_path / "saved"
    trainer = trained_trainer(tmp_path / "run")
    trainer.save_model(str(folder))
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        features = trainer.model.lcl.get_image_features(pixel_values)
    torch.save({"pixel_values": pixel_values, "features": features}, folder / "expected.pt")

    script = REMOTE_LOAD_SCRIPT.replace("SITE_PACKAGES", repr(sysconfig.get_paths()["purelib"]))
    script = script.replace("FOLDER", repr(str(folder)))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    # -I: no PYTHONPATH, no user site, no script or current folder on sys.path; -S: no site-packages hooks.
    completed = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
    assert "REMOTE_CODE_OK" in completed.stdout, completed.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# push_to_hub against a local stand-in of the Hub
# ---------------------------------------------------------------------------------------------


class RecordingHub(ThreadingHTTPServer):
    """Just the Hub endpoints that `create_repo` + `upload_folder` use; every request and commit is recorded.

    The preupload answer makes every file a "regular" upload, so file contents arrive inside the commit.
    """

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.requests, self.created_repos, self.commits = [], [], []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output quiet
        pass

    def _reply(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.server.requests.append(("GET", self.path))
        self._reply(404, {"error": f"not implemented in the stand-in: GET {self.path}"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        path = self.path.split("?")[0]
        self.server.requests.append(("POST", path))
        hub = self.server
        if path == "/api/repos/create":
            payload = json.loads(body)
            hub.created_repos.append({**payload, "authorization": self.headers.get("Authorization")})
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": payload["name"], "id": repo_id})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                     for item in lines if item["key"] == "file"}
            header = next(item["value"] for item in lines if item["key"] == "header")
            repo_id = path.split("/api/models/")[1].split("/commit/")[0]
            hub.commits.append({"repo_id": repo_id, "summary": header["summary"], "files": files,
                                "authorization": self.headers.get("Authorization")})
            oid = f"{len(hub.commits):040x}"
            return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid})
        self._reply(404, {"error": f"not implemented in the stand-in: POST {path}"})


@pytest.fixture
def hub():
    server = RecordingHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


PUSH_SCRIPT = r"""
import sys
sys.path.insert(0, TESTS)
from test_hub_lcl import trained_trainer
trainer = trained_trainer(OUTPUT_DIR, push_to_hub=True, hub_model_id="user/lcl-tiny", hub_token="hf_dummy_token")
trainer.push_to_hub(commit_message="End of training", datasets=["mmc4"], tags=["digits"])
print("PUSH_OK")
"""


def test_push_to_hub_uploads_config_weights_processor_card_and_code(hub, tmp_path):
    script = PUSH_SCRIPT.replace("TESTS", repr(str(REPO / "tests"))).replace("OUTPUT_DIR", repr(str(tmp_path / "run")))
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("HF_TOKEN", None)
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=300)
    assert "PUSH_OK" in completed.stdout, completed.stderr[-4000:] + f"\nrequests: {hub.requests}"

    assert hub.created_repos[0]["name"] == "lcl-tiny" and hub.created_repos[0]["organization"] == "user"
    assert hub.created_repos[0]["authorization"] == "Bearer hf_dummy_token"
    commit = hub.commits[-1]
    assert commit["repo_id"] == "user/lcl-tiny" and commit["summary"] == "End of training"
    assert commit["authorization"] == "Bearer hf_dummy_token"
    files = commit["files"]
    expected_files = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                      "processor_config.json", "README.md"} | CODE_FILES
    assert expected_files <= set(files), sorted(files)
    assert not any(name.startswith(("checkpoint-", "_tmp-")) for name in files)

    config = json.loads(files["config.json"])
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "lcl"
    weights = load_safetensors(files["model.safetensors"])
    _, reference = tiny_processor_and_model()
    assert set(weights) == set(reference.state_dict())
    assert files["modeling_lcl.py"] == (REPO / "modeling_lcl" / "modeling_lcl.py").read_bytes()

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert card.data.datasets == ["mmc4"] and {"lcl", "digits"} <= set(card.data.tags)
    assert {"loss", "loss_contrastive", "loss_generation", "train_loss"} <= set(card.data.training_metrics)
    assert json.loads(files["tokenizer.json"])["model"]["type"] == "BPE"


def test_push_folder_to_hub_uploads_a_saved_folder_in_one_commit(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the suite runs offline
    processor, model = tiny_processor_and_model()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    add_remote_code(tmp_path)
    info = push_folder_to_hub(tmp_path, "org/lcl-folder", token="hf_dummy_token", endpoint=hub.endpoint)

    assert info.oid == f"{1:040x}" and len(hub.commits) == 1
    assert hub.created_repos[0]["organization"] == "org" and hub.created_repos[0]["name"] == "lcl-folder"
    files = hub.commits[0]["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} | CODE_FILES <= set(files)
    assert hub.commits[0]["repo_id"] == "org/lcl-folder"
