//! `content` on SmolLM2-135M, ARC-Easy and PIQA: clearly above chance. Ignored by default
//! (minutes in a dev build); run it with
//!
//! ```sh
//! cargo test --release --test it eval_smollm2 -- --ignored --nocapture
//! ```
//!
//! `RORA_EVAL_LIMIT` (default 200) sets the questions per task. The model is
//! `$RORA_SMOLLM2_GGUF`, default `~/.cache/rora/models/SmolLM2-135M-Instruct.Q4_1.gguf`.

use candle_core::{DType, Device};
use rora::data::Task;
use rora::eval::{run_eval, EvalSpec, Protocol};
use rora::model::ModelSource;
use std::path::PathBuf;

fn gguf() -> Option<PathBuf> {
    let p = std::env::var_os("RORA_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| {
                PathBuf::from(h).join(".cache/rora/models/SmolLM2-135M-Instruct.Q4_1.gguf")
            })
        })?;
    p.is_file().then_some(p)
}

#[test]
#[ignore = "minutes; run in a release build (see the file's header)"]
fn smollm2_content_is_above_chance_on_arc_easy_and_piqa() {
    let Some(path) = gguf() else {
        rora::require::skip_or_fail(
            "smollm2",
            "the SmolLM2-135M GGUF is absent (scripts/fetch-smollm2.sh)",
        );
        return;
    };
    let limit: usize = std::env::var("RORA_EVAL_LIMIT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let loaded = rora::model::load(&ModelSource::Gguf(path), DType::F32, &Device::Cpu).unwrap();
    let mut spec = EvalSpec::new("smollm2", [Task::ArcEasy, Task::Piqa]);
    spec.data_dir = crate::common::shared_dir().join("data/commonsense");
    spec.limit = Some(limit);
    spec.protocol = vec![Protocol::Content];
    spec.bos = std::env::var("RORA_EVAL_BOS").ok().map(|v| v == "1");
    let report = run_eval(&spec, &loaded.model, &loaded.tokenizer, 42)
        .unwrap()
        .report;
    println!("{}", report.to_markdown());
    let content = report.protocol(Protocol::Content).unwrap();
    // Chance: ARC-Easy about 1/4, PIQA 1/2. Lower interval ends above chance.
    let arc = content.tasks.iter().find(|t| t.column == "ARC-e").unwrap();
    let piqa = content.tasks.iter().find(|t| t.column == "PIQA").unwrap();
    assert!(
        arc.ci95[0] > 0.25 && arc.acc_norm_ci95.unwrap()[0] > 0.25,
        "{arc:?}"
    );
    assert!(
        piqa.ci95[0] > 0.5 && piqa.acc_norm_ci95.unwrap()[0] > 0.5,
        "{piqa:?}"
    );
}
