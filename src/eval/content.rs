//! The `content` protocol's contexts and continuations, as lm-evaluation-harness writes
//! them (one `(context, continuation)` pair per allowed label, in label order):
//!
//! - ARC, OpenBookQA, SIQA, PIQA: `Question: {question}\nAnswer:` + ` {option}`;
//! - BoolQ: the same context, ` yes` for `true` and ` no` for `false` (the passage is not
//!   in LLM-Adapters' data);
//! - HellaSwag: `{activity}: {context}` (the text after the lead-in) + ` {ending}`, both
//!   through lm-eval's `preprocess` (drop ` [title]`/`[header]`-style tags, collapse double
//!   spaces; a no-op on the already cleaned `test_preprocessed.json`). The raw `ctx_b` is
//!   not capitalised as lm-eval does, since the files no longer separate `ctx_a`/`ctx_b`;
//! - WinoGrande, partial scoring: context = the sentence up to `_` with the option put in,
//!   continuation = ` ` + the rest of the sentence after `_`, trimmed (the same for both).

pub use crate::data::options::hellaswag_preprocess;
use crate::data::{Question, Task};
use anyhow::{bail, Result};

/// `(context, continuation)` per allowed label of `q`.
pub fn content_pairs(q: &Question) -> Result<Vec<(String, String)>> {
    let p = &q.parsed;
    let qa = || format!("Question: {}\nAnswer:", p.question);
    Ok(match q.task {
        Task::BoolQ => p
            .labels
            .iter()
            .map(|l| (qa(), if l == "true" { " yes" } else { " no" }.to_string()))
            .collect(),
        Task::Piqa | Task::SocialIqa | Task::ArcEasy | Task::ArcChallenge | Task::OpenBookQa => {
            p.options.iter().map(|o| (qa(), format!(" {o}"))).collect()
        }
        Task::HellaSwag => {
            let ctx = hellaswag_preprocess(&p.question);
            p.options
                .iter()
                .map(|o| (ctx.clone(), format!(" {}", hellaswag_preprocess(o))))
                .collect()
        }
        Task::WinoGrande => {
            let s = &p.question;
            let Some(blank) = s.find('_') else {
                bail!(
                    "task winogrande item {}: the sentence has no `_` blank",
                    q.index
                );
            };
            let cont = format!(" {}", s[blank + 1..].trim());
            p.options
                .iter()
                .map(|o| (format!("{}{o}", &s[..blank]), cont.clone()))
                .collect()
        }
    })
}
