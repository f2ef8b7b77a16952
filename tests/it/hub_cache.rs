//! `hf:org/name` through a Hugging Face cache folder laid out as hf-hub and
//! `huggingface-cli download` lay it out (refs/, snapshots/ with links into blobs/).

use crate::common::*;
use std::path::Path;
use std::process::Command;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn lay_out_cache(cache: &Path) {
    let repo = cache.join("models--tiny-org--stories260K");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    for (i, f) in ["config.json", "model.safetensors", "tokenizer.json"]
        .iter()
        .enumerate()
    {
        let blob = repo.join("blobs").join(format!("blob{i}"));
        std::fs::copy(stories_dir().join(f), &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), snap.join(f)).unwrap();
    }
}

fn inspect(cache: &Path, source: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_recover"))
        .args(["inspect", source, "--json"])
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

#[test]
fn hub_ids_resolve_through_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    lay_out_cache(tmp.path());

    for source in [
        "hf:tiny-org/stories260K",
        &format!("hf:tiny-org/stories260K@{COMMIT}"),
    ] {
        let out = inspect(tmp.path(), source);
        assert!(
            out.status.success(),
            "{source}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["num_layers"], 5);
        assert!(v["source"]
            .as_str()
            .unwrap()
            .starts_with("hf:tiny-org/stories260K@"));
    }

    // Offline and not cached: the error names the repo and says how to get it.
    let out = inspect(tmp.path(), "hf:someone/missing-model");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "hf:someone/missing-model@main",
        "huggingface-cli download someone/missing-model",
        "HF_HUB_CACHE",
    ] {
        assert!(err.contains(needle), "lacks `{needle}`: {err}");
    }

    let out = inspect(tmp.path(), "hf:not a repo");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hf:org/name"));
}
