"""BatchConfig: where values come from, validation, and secrets that never leak."""

from __future__ import annotations

import copy
import dataclasses
import logging
import pickle
import re
import sys
from typing import Any

import pytest

from joblib_azurebatch.config import DEFAULT_IMAGE, BatchConfig, default_image
from joblib_azurebatch.errors import ConfigError, CredentialError

KEY = "c2VjcmV0LWJhdGNoLWtleS1kby1ub3Qtc2hvdw=="  # base64 of a recognisable secret
SKEY = "c2VjcmV0LXN0b3JhZ2Uta2V5LWRvLW5vdC1zaG93"
CONN = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=TOPSECRETCONN;"

FULL_ENV = {
    "BATCH_ACCOUNT_NAME": "superbatch",
    "BATCH_ACCOUNT_KEY": KEY,
    "BATCH_ACCOUNT_URL": "https://superbatch.westus2.batch.azure.com",
    "STORAGE_ACCOUNT_NAME": "superstore",
    "STORAGE_ACCOUNT_KEY": SKEY,
    "JOBLIB_AZUREBATCH_POOL_ID": "env-pool",
    "JOBLIB_AZUREBATCH_DEDICATED_NODES": "5",
    "JOBLIB_AZUREBATCH_SPOT_NODES": "7",
    "JOBLIB_AZUREBATCH_TASK_SLOTS_PER_NODE": "4",
    "JOBLIB_AZUREBATCH_VM_SIZE": "STANDARD_A1_v2",
    "JOBLIB_AZUREBATCH_JOB_ID": "env_job",
    "JOBLIB_AZUREBATCH_CONTAINER": "env-container",
    "JOBLIB_AZUREBATCH_IMAGE": "me/worker:1",
    "JOBLIB_AZUREBATCH_REGISTRY_SERVER": "me.azurecr.io",
    "JOBLIB_AZUREBATCH_REGISTRY_USERNAME": "me",
    "JOBLIB_AZUREBATCH_REGISTRY_PASSWORD": "REGISTRYPASSWORD",
    "JOBLIB_AZUREBATCH_KEEP_POOL": "true",
    "JOBLIB_AZUREBATCH_KEEP_JOB": "0",
    "JOBLIB_AZUREBATCH_TASK_TIMEOUT": "90.5",
    "JOBLIB_AZUREBATCH_MAX_TASK_RETRIES": "-1",
}

#: SuperBatch's keyword names, which were never environment variables; other tools set
#: some of them (this machine may have CONTAINER_NAME, for one).
SUPERBATCH_NAMES = {
    "POOL_ID": "generic-pool",
    "POOL_NODE_COUNT": "9",
    "POOL_LOW_PRIORITY_NODE_COUNT": "9",
    "POOL_VM_SIZE": "generic_size",
    "JOB_ID": "generic-job",
    "CONTAINER_NAME": "generic-container",
    "DOCKER_CONTAINER": "generic/image:1",
    "DELETE_POOL_WHEN_DONE": "false",
    "DELETE_JOB_WHEN_DONE": "false",
    "BATCH_DIRECTORY": "/tmp/somewhere",
}


def test_credentials_and_prefixed_variables_are_read() -> None:
    cfg = BatchConfig.from_env(environ=FULL_ENV)
    assert cfg.batch_account == "superbatch"
    assert cfg.batch_key == KEY
    assert cfg.batch_url == "https://superbatch.westus2.batch.azure.com"
    assert cfg.storage_account == "superstore"
    assert cfg.storage_key == SKEY
    assert cfg.pool_id == "env-pool"
    assert (cfg.dedicated_nodes, cfg.spot_nodes, cfg.task_slots_per_node) == (5, 7, 4)
    assert cfg.vm_size == "STANDARD_A1_v2"
    assert cfg.job_id == "env_job"
    assert cfg.container == "env-container"
    assert cfg.image == "me/worker:1"
    assert (cfg.registry_server, cfg.registry_username) == ("me.azurecr.io", "me")
    assert cfg.registry_password == "REGISTRYPASSWORD"
    assert (cfg.keep_pool, cfg.keep_job) == (True, False)
    assert (cfg.task_timeout, cfg.max_task_retries) == (90.5, -1)
    assert cfg.blob_url == "https://superstore.blob.core.windows.net"
    assert cfg.validate() is cfg


def test_every_field_but_the_credentials_has_a_prefixed_variable() -> None:
    credentials = {
        "batch_url",
        "batch_account",
        "batch_key",
        "storage_account",
        "storage_url",
        "storage_key",
        "storage_connection_string",
    }
    for name, variables in BatchConfig.ENV_VARS.items():
        if name in credentials:
            assert not any(v.startswith("JOBLIB_AZUREBATCH_") for v in variables), name
        else:
            assert variables == (f"JOBLIB_AZUREBATCH_{name.upper()}",)
    fields = {f.name for f in dataclasses.fields(BatchConfig)}
    assert set(BatchConfig.ENV_VARS) == fields - {"batch_credential", "storage_credential"}


def test_generic_names_in_the_environment_change_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert BatchConfig.from_env(environ=SUPERBATCH_NAMES) == BatchConfig()
    # The real environment: an unrelated CONTAINER_NAME (set by other tools) is not ours.
    for variables in BatchConfig.ENV_VARS.values():
        for variable in variables:
            monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("CONTAINER_NAME", "someone-elses-container")
    assert BatchConfig.from_env().container == "joblib-azurebatch"
    monkeypatch.setenv("JOBLIB_AZUREBATCH_CONTAINER", "ours")
    assert BatchConfig.from_env().container == "ours"


def test_superbatch_keyword_names_carry_a_config_over() -> None:
    cfg = BatchConfig.from_env(
        environ={},
        BATCH_ACCOUNT_NAME="superbatch",
        BATCH_ACCOUNT_KEY=KEY,
        BATCH_ACCOUNT_URL="https://superbatch.westus2.batch.azure.com",
        STORAGE_ACCOUNT_NAME="superstore",
        STORAGE_ACCOUNT_KEY=SKEY,
        POOL_ID="my-compute-pool",
        POOL_NODE_COUNT=0,
        POOL_LOW_PRIORITY_NODE_COUNT=20,
        POOL_VM_SIZE="STANDARD_A1_v2",
        DELETE_POOL_WHEN_DONE=False,
        JOB_ID="my-job",
        DELETE_JOB_WHEN_DONE=True,
        CONTAINER_NAME="my-blob-container",
        DOCKER_CONTAINER="me/worker:2",
    )
    assert (cfg.batch_account, cfg.batch_key, cfg.storage_account, cfg.storage_key) == (
        "superbatch",
        KEY,
        "superstore",
        SKEY,
    )
    assert cfg.batch_url == "https://superbatch.westus2.batch.azure.com"
    assert (cfg.pool_id, cfg.dedicated_nodes, cfg.spot_nodes) == ("my-compute-pool", 0, 20)
    assert (cfg.vm_size, cfg.job_id, cfg.container) == (
        "STANDARD_A1_v2",
        "my-job",
        "my-blob-container",
    )
    assert cfg.image == "me/worker:2"
    assert (cfg.keep_pool, cfg.keep_job) == (True, False)  # the DELETE_* flags, inverted
    assert cfg.validate() is cfg
    # A keyword beats the environment whichever name it has; None is "not given".
    env = {"JOBLIB_AZUREBATCH_POOL_ID": "from-env"}
    assert BatchConfig.from_env(environ=env, POOL_ID="from-kw").pool_id == "from-kw"
    assert BatchConfig.from_env(environ=env, POOL_ID=None).pool_id == "from-env"
    assert BatchConfig.from_env(environ={}, POOL_ID="a", pool_id=None).pool_id == "a"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"POOL_ID": "a", "pool_id": "b"}, "POOL_ID and pool_id set the same option"),
        ({"POOL_ID": "a", "pool_id": "a"}, "POOL_ID and pool_id set the same option"),
        (
            {"DELETE_POOL_WHEN_DONE": True, "keep_pool": True},
            "DELETE_POOL_WHEN_DONE and keep_pool set the same option",
        ),
        ({"DELETE_JOB_WHEN_DONE": "no"}, "DELETE_JOB_WHEN_DONE must be True or False"),
        ({"BATCH_DIRECTORY": "/data/batch"}, "BATCH_DIRECTORY has no meaning here.*in memory"),
        ({"pool_size": 3}, "no option pool_size.*SuperBatch's names .*POOL_ID"),
    ],
)
def test_superbatch_keyword_mistakes_are_refused(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        BatchConfig.from_env(environ={}, **overrides)


def test_azure_variables_are_read_and_superbatch_ones_win() -> None:
    env = {
        "AZURE_BATCH_ACCOUNT": "azacct",
        "AZURE_BATCH_ENDPOINT": "https://azacct.eastus.batch.azure.com",
        "AZURE_BATCH_ACCESS_KEY": KEY,
        "AZURE_STORAGE_ACCOUNT": "azstore",
        "AZURE_STORAGE_KEY": SKEY,
        "AZURE_STORAGE_CONNECTION_STRING": CONN,
    }
    cfg = BatchConfig.from_env(environ=env)
    assert cfg.batch_account == "azacct"
    assert cfg.batch_url == "https://azacct.eastus.batch.azure.com"
    assert cfg.batch_key == KEY
    assert cfg.storage_account == "azstore"
    assert cfg.storage_connection_string == CONN
    both = BatchConfig.from_env(environ={**env, "BATCH_ACCOUNT_NAME": "sb"})
    assert both.batch_account == "sb"


def test_keyword_beats_environment_beats_default() -> None:
    env = {"JOBLIB_AZUREBATCH_POOL_ID": "from-env"}
    assert BatchConfig.from_env(environ={}).pool_id == "joblib-azurebatch"
    assert BatchConfig.from_env(environ=env).pool_id == "from-env"
    assert BatchConfig.from_env(environ=env, pool_id="from-kw").pool_id == "from-kw"
    # None means "not given": the environment still applies.
    assert BatchConfig.from_env(environ=env, pool_id=None).pool_id == "from-env"
    # The plain constructor reads no environment.
    assert BatchConfig().pool_id == "joblib-azurebatch"


def test_quoted_values_from_az_cli_are_unquoted() -> None:
    cfg = BatchConfig.from_env(environ={"BATCH_ACCOUNT_KEY": f'"{KEY}"\n'})
    assert cfg.batch_key == KEY


def test_unknown_option_is_refused() -> None:
    with pytest.raises(ConfigError, match="no option pool_size"):
        BatchConfig.from_env(environ={}, pool_size=3)
    with pytest.raises(ConfigError, match="no option colour"):
        BatchConfig().replace(colour="red")


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        BatchConfig("https://x.batch.azure.com")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"JOBLIB_AZUREBATCH_DEDICATED_NODES": "five"},
            "JOBLIB_AZUREBATCH_DEDICATED_NODES must be a whole number",
        ),
        (
            {"JOBLIB_AZUREBATCH_KEEP_POOL": "maybe"},
            "JOBLIB_AZUREBATCH_KEEP_POOL must be true or false",
        ),
        (
            {"JOBLIB_AZUREBATCH_POLL_INTERVAL": "soon"},
            "JOBLIB_AZUREBATCH_POLL_INTERVAL must be a number of seconds",
        ),
        ({"JOBLIB_AZUREBATCH_POOL_ID": "bad pool!"}, "JOBLIB_AZUREBATCH_POOL_ID.*not a valid"),
        (
            {"JOBLIB_AZUREBATCH_CONTAINER": "Has_Upper"},
            r"container \(JOBLIB_AZUREBATCH_CONTAINER\).*not a valid blob container name",
        ),
    ],
)
def test_bad_environment_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BatchConfig.from_env(environ=env)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pool_id": "x" * 65}, "pool_id"),
        ({"pool_id": ""}, "pool_id"),
        ({"job_id": "a.b"}, "job_id"),
        ({"container": "ab"}, "container"),
        ({"container": "a--b"}, "container"),
        ({"container": "-abc"}, "container"),
        ({"container": "abc-"}, "container"),
        ({"container": "x" * 64}, "container"),
        ({"dedicated_nodes": -2}, "dedicated_nodes must be at least 0"),
        ({"dedicated_nodes": 0, "spot_nodes": 0}, "both 0"),
        ({"spot_nodes": 1.5}, "spot_nodes must be a whole number"),
        ({"task_slots_per_node": 0}, "task_slots_per_node must be at least 1"),
        ({"max_task_retries": -2}, "max_task_retries"),
        ({"task_timeout": 0}, "task_timeout must be a positive"),
        ({"sas_expiry": -5.0}, "sas_expiry"),
        ({"poll_interval": 0.0}, "poll_interval"),
        ({"pool_timeout": True}, "pool_timeout"),
        ({"retry_budget": 0.0}, "retry_budget"),
        ({"inline_threshold": -1}, "inline_threshold"),
        ({"batch_url": "batch.azure.com"}, "batch_url .* must be an http"),
        ({"storage_url": "ftp://x"}, "storage_url"),
        ({"keep_pool": "yes"}, "keep_pool must be True or False"),
        ({"registry_username": "u"}, "registry_username and registry_password"),
        ({"image": ""}, "image must be a non-empty"),
    ],
)
def test_static_validation_runs_in_the_constructor(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        BatchConfig(**changes)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        BatchConfig().replace(**changes)


def test_valid_edge_values_are_accepted() -> None:
    cfg = BatchConfig(
        pool_id="A" * 64,
        job_id="job_1-x",
        container="a-b-c",
        dedicated_nodes=0,
        spot_nodes=3,
        max_task_retries=-1,
        task_timeout=1.5,
        inline_threshold=0,
    )
    assert cfg.target_slots == 3
    assert BatchConfig(container="a" * 63).container == "a" * 63


@pytest.mark.parametrize(
    ("kwargs", "variable"),
    [
        ({}, "BATCH_ACCOUNT_URL"),
        ({"batch_url": "https://a.b.batch.azure.com", "batch_key": KEY}, "BATCH_ACCOUNT_NAME"),
        ({"batch_url": "https://a.b.batch.azure.com"}, "STORAGE_ACCOUNT_NAME"),
        (
            {
                "batch_url": "https://a.b.batch.azure.com",
                "storage_url": "https://s",
                "storage_key": SKEY,
            },
            "STORAGE_ACCOUNT_NAME",
        ),
    ],
)
def test_missing_credentials_say_which_variable_to_set(
    kwargs: dict[str, Any], variable: str
) -> None:
    cfg = BatchConfig(**kwargs)  # constructing is fine: nothing needs the accounts yet
    with pytest.raises(CredentialError, match=variable):
        cfg.validate()


def test_token_credentials_need_no_key() -> None:
    class FakeCredential:
        def get_token(self, *scopes: str, **kwargs: object) -> object:
            raise AssertionError("not called by validation")

    cfg = BatchConfig(
        batch_url="https://a.westus.batch.azure.com",
        batch_credential=FakeCredential(),
        storage_account="store",
        storage_credential=FakeCredential(),
    )
    assert cfg.validate() is cfg


def test_malformed_key_is_refused_without_showing_it() -> None:
    bad = "not base64 but very secret!!"
    with pytest.raises(CredentialError) as info:
        BatchConfig(batch_key=bad)
    assert "BATCH_ACCOUNT_KEY" in str(info.value)
    assert bad not in str(info.value)
    assert "secret" not in str(info.value)


def test_secrets_never_appear_in_repr_str_logs_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    cfg = BatchConfig.from_env(
        environ=FULL_ENV,
        storage_connection_string=CONN,
        registry_server="r.azurecr.io",
        registry_username="user",
        registry_password="REGISTRYPASSWORD",
    )
    secrets = [KEY, SKEY, "TOPSECRETCONN", "REGISTRYPASSWORD"]
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("config %s %r", cfg, cfg)
    texts = [repr(cfg), str(cfg), f"{cfg}", caplog.text]
    for bad_change in ({"pool_id": "no spaces allowed"}, {"container": "NO"}, {"spot_nodes": -3}):
        with pytest.raises(ConfigError) as info:
            cfg.replace(**bad_change)
        texts.append(str(info.value))
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert "batch_key=<hidden>" in repr(cfg)
    assert "pool_id='env-pool'" in repr(cfg)


def test_config_refuses_to_be_pickled_but_copies() -> None:
    cfg = BatchConfig(batch_key=KEY)
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(cfg)
    assert copy.deepcopy(cfg) is cfg
    assert copy.copy(cfg) is cfg


def test_replace_gives_a_changed_copy() -> None:
    cfg = BatchConfig(pool_id="a")
    other = cfg.replace(pool_id="b", spot_nodes=2)
    assert (cfg.pool_id, other.pool_id, other.spot_nodes) == ("a", "b", 2)
    with pytest.raises(AttributeError):
        cfg.pool_id = "c"  # type: ignore[misc]


def test_new_job_id_is_unique_and_valid() -> None:
    ids = {BatchConfig().new_job_id() for _ in range(200)}
    assert len(ids) == 200
    long_prefix = BatchConfig(job_id="p" * 64)
    for job_id in [*ids, long_prefix.new_job_id()]:
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", job_id)
    assert BatchConfig(job_id="myrun").new_job_id().startswith("myrun-")
    BatchConfig(job_id=long_prefix.new_job_id())  # itself a valid job id


def test_docker_image_tag_matches_the_running_python() -> None:
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert DEFAULT_IMAGE.endswith(f"-py{minor}")
    assert default_image("3.12").endswith("-py3.12")


def test_by_default_the_nodes_run_the_public_python_image_of_the_client() -> None:
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    cfg = BatchConfig()
    assert cfg.image is None
    assert cfg.installs_environment
    assert cfg.node_image == f"python:{minor}-slim"
    assert BatchConfig(base_image="myacr.azurecr.io/python:3.11-slim").node_image == (
        "myacr.azurecr.io/python:3.11-slim"
    )
    own = BatchConfig(image=DEFAULT_IMAGE)
    assert own.node_image == DEFAULT_IMAGE
    assert not own.installs_environment


def test_environment_options_are_checked_before_anything_is_created(tmp_path) -> None:
    with pytest.raises(ConfigError, match="list of strings"):
        BatchConfig(packages="lightgbm==4.5.0")  # a string, not a list
    with pytest.raises(ConfigError, match="does not exist"):
        BatchConfig(requirements_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="http"):
        BatchConfig(extra_index_urls=("ftp://example",))
    with pytest.raises(ConfigError, match="already hold them"):
        BatchConfig(image=DEFAULT_IMAGE, packages=("lightgbm==4.5.0",))
    with pytest.raises(ConfigError, match="exclude each other"):
        BatchConfig(image=DEFAULT_IMAGE, base_image="python:3.11-slim")
    assert BatchConfig(packages=["a==1", "b"]).packages == ("a==1", "b")


def test_environment_lists_come_from_the_environment_split_like_pip() -> None:
    cfg = BatchConfig.from_env(
        environ={
            "JOBLIB_AZUREBATCH_PACKAGES": "lightgbm==4.5.0, xgboost  polars",
            "JOBLIB_AZUREBATCH_EXTRA_INDEX_URLS": "https://a.example/simple https://b.example",
        }
    )
    assert cfg.packages == ("lightgbm==4.5.0", "xgboost", "polars")
    assert cfg.extra_index_urls == ("https://a.example/simple", "https://b.example")


def test_the_retry_budget_is_ten_minutes_unless_the_environment_says_otherwise() -> None:
    assert BatchConfig().retry_budget == 600.0
    env = {"JOBLIB_AZUREBATCH_RETRY_BUDGET": "1800"}
    assert BatchConfig.from_env(environ=env).retry_budget == 1800.0


def test_spot_nodes_alone_mean_a_pool_of_spot_nodes_only():
    assert BatchConfig.from_env(spot_nodes=8, environ={}).dedicated_nodes == 0
    assert BatchConfig(spot_nodes=8).dedicated_nodes == 0
    assert BatchConfig().dedicated_nodes == 1
    both = BatchConfig(dedicated_nodes=2, spot_nodes=8)
    assert (both.dedicated_nodes, both.spot_nodes) == (2, 8)


def test_a_misspelt_option_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"spot_node \(did you mean spot_nodes\?\)"):
        BatchConfig.from_env(spot_node=8, environ={})
    with pytest.raises(ConfigError, match=r"did you mean keep_pool\?"):
        BatchConfig().replace(keep_pools=True)
