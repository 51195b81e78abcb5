from pathlib import Path

import pytest

from kvc.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults():
    cfg = load_config(None)
    assert cfg.attn.page_size == 16 and cfg.kvc.cpu_memory_size_GB == 4
    assert cfg.server.host == "127.0.0.1" and cfg.server.http_port == 30000


def test_yaml_and_kvc2_alias_and_tilde(tmp_path):
    cfg = load_config(write(tmp_path, "kvc2:\n  disk_path: ~/kv\n  cpu_memory_size_GB: 1\nattn: {page_size: 32}\n"))
    assert cfg.kvc.cpu_memory_size_GB == 1.0 and cfg.attn.page_size == 32
    assert not cfg.kvc.disk_path.startswith("~") and cfg.kvc.disk_path.endswith("/kv")


@pytest.mark.parametrize("text,needle", [
    ("kvc: {cpu_memory_GB: 1}", "kvc.cpu_memory_GB"),
    ("kvcache: {}", "kvcache"),
    ("attn: {page_size: 0}", "attn.page_size"),
    ("attn: {page_size: 1.5}", "attn.page_size"),
    ("kvc: {utilization_percentage: 1.5}", "kvc.utilization_percentage"),
    ("kvc: {gpu_only: 'yes'}", "kvc.gpu_only"),
    ("experts: {placement_strategy: hottest}", "experts.placement_strategy"),
    ("kvc: {cpu_memory_size_GB: 100000}", "larger than this machine"),
    ("kvc: {}\nkvc2: {}", "alias"),
    ("kvc: {low_watermark: 0.99}", "low_watermark"),
    ("experts: {num_gpu_experts: 2, gpu_experts_ratio: 0.5}", "not both"),
    ("- a\n- b", "mapping"),
    ("attn: {backend: triton}", "attn.backend must be one of auto, reference"),
    ("attn: {prefill_kernel: fa3}", "attn.prefill_kernel must be one of auto, triton, flash"),
    ("attn: {chunk_size: big}", "attn.chunk_size must be an integer or auto, got 'big'"),
    ("attn: {chunk_size: 0}", r"attn.chunk_size must be in \[1, "),
    ("server: {auth_tokens: [tok]}", "server.auth_tokens must be a mapping of strings to strings"),
    ("server: {auth_tokens: {1: tenant}}", "server.auth_tokens must be a mapping of strings to strings"),
    ("server: {auth_tokens: {tok: 1}}", "server.auth_tokens must be a mapping of strings to strings"),
    ("server: {max_message_bytes: 4294967296}", r"server.max_message_bytes must be in \[1048576, 2147483647\]"),
    ("kvc: {disk_size_GB: 1e300}", r"kvc.disk_size_GB must be in \[0.0, 1000000000.0\]"),
    ("kvc: 0", "config section 'kvc' must be a mapping, got 0"),
    ("kvc: []", "config section 'kvc' must be a mapping"),
    ("kvc: false", "config section 'kvc' must be a mapping"),
    ("kvc: ''", "config section 'kvc' must be a mapping"),
    ("server: 0", "config section 'server' must be a mapping"),
    ("0", "must hold a mapping of sections"),
    ("false", "must hold a mapping of sections"),
])
def test_bad_values_name_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, text))


def test_every_float_key_must_be_finite(tmp_path):
    """.nan passes every range check (each comparison with it is false) and .inf every open-ended
    one: each float key refuses both (before: accepted; high_watermark .nan stopped all disk
    eviction, disk_size_GB .inf was an OverflowError at start)."""
    import typing

    from kvc.config import _SECTIONS
    keys = [(section, name) for section, cls in _SECTIONS.items()
            for name, hint in typing.get_type_hints(cls).items() if float in (hint, *typing.get_args(hint))]
    assert ("kvc", "high_watermark") in keys and ("server", "rpc_timeout_s") in keys and len(keys) >= 12
    for section, name in keys:
        for bad in (".nan", ".inf", "-.inf", "1e999"):
            with pytest.raises(ConfigError, match=f"{section}.{name} must be a finite number"):
                load_config(write(tmp_path, f"{section}: {{{name}: {bad}}}"))


def test_empty_sections_and_files_are_the_defaults(tmp_path):
    """Only a missing section, an empty one (null) or {} means the defaults; so does an empty file."""
    for text in ("", "kvc:\n", "kvc: {}\nserver: null\n", "# nothing\n"):
        assert load_config(write(tmp_path, text)) == load_config(None)


def test_numbers_yaml_11_leaves_as_strings_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 1e3 and 5E-1 as strings; a float key takes them as the numbers they
    look like (before: "must be a number, got '1e3'"). Words stay errors."""
    cfg = load_config(write(tmp_path, "kvc: {disk_size_GB: 1e3, utilization_percentage: 5E-1, "
                                      "cpu_memory_size_GB: '+2.5e0'}"))
    assert (cfg.kvc.disk_size_GB, cfg.kvc.utilization_percentage, cfg.kvc.cpu_memory_size_GB) == (1000.0, 0.5, 2.5)
    for bad in ("four", "1e", "e3", "1e3.5", "nan", "inf"):
        with pytest.raises(ConfigError, match="kvc.disk_size_GB must be a number"):
            load_config(write(tmp_path, f"kvc: {{disk_size_GB: '{bad}'}}"))
    with pytest.raises(ConfigError, match="attn.page_size must be an integer"):
        load_config(write(tmp_path, "attn: {page_size: 1e3}"))  # ints stay strict


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "kvc: {a: [1,"))
    # a folder, and a file that is not UTF-8: the message names the file (before: "does not
    # exist", and the codec's message alone)
    with pytest.raises(ConfigError, match=f"config file '{tmp_path}' cannot be read: Is a directory"):
        load_config(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"kvc: {disk_path: /caf\xe9}\n")
    with pytest.raises(ConfigError, match=f"config file '{latin}' is not UTF-8 text"):
        load_config(latin)


def test_overrides_by_leaf_and_dotted_name():
    cfg = load_config(None, page_size=8, **{"kvc.disk_path": None})
    assert cfg.attn.page_size == 8 and cfg.kvc.disk_path is None
    with pytest.raises(ConfigError, match="unknown config key 'pagesize'"):
        load_config(None, pagesize=8)


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(Exception):
        cfg.attn.page_size = 3


def test_chunk_size_auto_by_device(tmp_path):
    """attn.chunk_size: unset, null or "auto" is 2048 on CUDA and 256 on the CPU; a number is kept."""
    from kvc.config import chunk_size_for
    for text in ("attn: {}", "attn: {chunk_size: auto}", "attn: {chunk_size: null}"):
        attn = load_config(write(tmp_path, text)).attn
        assert attn.chunk_size is None
        assert (chunk_size_for(attn, "cuda"), chunk_size_for(attn, "cpu")) == (2048, 256)
    attn = load_config(write(tmp_path, "attn: {chunk_size: 512}")).attn
    assert (chunk_size_for(attn, "cuda"), chunk_size_for(attn, "cpu")) == (512, 512)
    assert chunk_size_for(load_config(chunk_size=64).attn, "cuda") == 64
    for name in ("configs/default.yaml", "deploy/config/serve.yaml"):  # the shipped files say auto
        path = Path(__file__).resolve().parents[2] / name
        assert load_config(path).attn.chunk_size is None, name


def test_a_key_given_twice_is_an_error(tmp_path):
    # PyYAML keeps the last of two equal keys: the first kvc section's keys were silently dropped
    p = tmp_path / "dup.yaml"
    p.write_text("kvc:\n  cpu_memory_size_GB: 1\n  disk_path: /data/pages\nmodel:\n  device: cpu\n"
                 "kvc:\n  cpu_memory_size_GB: 4\n")
    with pytest.raises(ConfigError, match=r"key 'kvc' appears twice in one mapping \(first at line 1\)"):
        load_config(p)
    p.write_text("kvc:\n  cpu_memory_size_GB: 1\n  cpu_memory_size_GB: 2\n")
    with pytest.raises(ConfigError, match="'cpu_memory_size_GB' appears twice"):
        load_config(p)
    p.write_text("kvc:\n  cpu_memory_size_GB: 1\nmodel:\n  device: cpu\n")  # equal keys in other mappings
    assert load_config(p).kvc.cpu_memory_size_GB == 1
