//! Answer extraction for the `generate` protocol: the first match of the task's pattern
//! in the generated text (LLM-Adapters' `extract_answer`), case-sensitive.
//!
//! One deliberate difference from upstream's regex (`answer1|answer2|...`): a numbered
//! label must not be followed by another digit, so `answer12` or `answer10` is *not*
//! read as `answer1`; the scan goes on to the next occurrence. Labels carry no other
//! word-boundary rule, as upstream: `theanswer2` reads as `answer2`, `untrue` as `true`.
//! Labels outside the question's own format (`answer5` on a 4-choice question) are still
//! matches, and simply wrong, as upstream. Only the text before a second
//! `### Response:` counts (upstream splits the decoded output on that marker).

use crate::data::Task;

/// The first label of `task`'s pattern found in `generation`, if any.
pub fn extract_answer(task: Task, generation: &str) -> Option<String> {
    let text = generation
        .split("### Response:")
        .next()
        .unwrap_or(generation);
    let labels = task.pattern_labels();
    let bytes = text.as_bytes();
    for start in 0..bytes.len() {
        for label in &labels {
            if !bytes[start..].starts_with(label.as_bytes()) {
                continue;
            }
            let end = start + label.len();
            let numbered = label.as_bytes().last().is_some_and(u8::is_ascii_digit);
            if numbered && bytes.get(end).is_some_and(u8::is_ascii_digit) {
                continue;
            }
            return Some(label.clone());
        }
    }
    None
}
