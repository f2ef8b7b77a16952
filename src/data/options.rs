//! Reading a question back out of an LLM-Adapters instruction: the allowed labels (the
//! `Answer format:` line), the question text after the task's lead-in, and each option's
//! text (`Answer1: … Answer2: …`, `Solution1:`, `Ending1:`, `Option1:`); and HellaSwag's
//! text cleaning, which evaluation and the `answers` data format share.

use super::tasks::Task;

/// A question split into its parts. For BoolQ `options` is empty (the labels are
/// `true`/`false` and there is nothing to parse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedQuestion {
    /// The text between the task's lead-in and the first option (or, for BoolQ, the
    /// `Answer format:` line), trimmed.
    pub question: String,
    /// One text per label, trimmed, never empty (multiple-choice tasks).
    pub options: Vec<String>,
    /// The labels the `Answer format:` line allows, in order.
    pub labels: Vec<String>,
}

const FORMAT: &str = "Answer format:";

/// The labels listed by the instruction's `Answer format:` line (its last occurrence).
pub fn answer_format(instruction: &str) -> Option<Vec<String>> {
    let at = instruction.rfind(FORMAT)?;
    let labels: Vec<String> = instruction[at + FORMAT.len()..]
        .trim()
        .split('/')
        .map(|s| s.trim().to_string())
        .collect();
    (!labels.iter().any(String::is_empty)).then_some(labels)
}

/// `answer1` → `Answer1:`, the marker that introduces the option in the instruction.
fn marker(label: &str) -> String {
    let mut c = label.chars();
    match c.next() {
        Some(f) => format!("{}{}:", f.to_uppercase(), c.as_str()),
        None => ":".into(),
    }
}

/// Splits `instruction` of `task` into question, options and labels. The error says what
/// is wrong (the caller adds the file and item).
pub fn parse_instruction(task: Task, instruction: &str) -> Result<ParsedQuestion, String> {
    let labels = answer_format(instruction)
        .ok_or_else(|| "the instruction has no `Answer format: a/b/...` line".to_string())?;
    // The labels must be the task's own, in order: true/false or stem1..stemN.
    let expected: Vec<String> = match task.label_stem() {
        None => vec!["true".into(), "false".into()],
        Some(stem) => (1..=labels.len()).map(|i| format!("{stem}{i}")).collect(),
    };
    let allowed = task.pattern_labels();
    if labels != expected || labels.iter().any(|l| !allowed.contains(l)) || labels.len() < 2 {
        return Err(format!(
            "`Answer format: {}` is not a valid format for {} (expected labels like {})",
            labels.join("/"),
            task.name(),
            allowed.join("/")
        ));
    }
    let body = &instruction[..instruction.rfind(FORMAT).expect("found above")];
    let body = body.trim_end();
    let rest = body.strip_prefix(task.lead_in()).ok_or_else(|| {
        format!(
            "the instruction does not start with {}'s lead-in `{}`",
            task.name(),
            task.lead_in().trim_end()
        )
    })?;
    if task == Task::BoolQ {
        let question = rest.trim().to_string();
        if question.is_empty() {
            return Err("empty question".into());
        }
        return Ok(ParsedQuestion {
            question,
            options: Vec::new(),
            labels,
        });
    }
    let markers: Vec<String> = labels.iter().map(|l| marker(l)).collect();
    let first = rest
        .rfind(&format!("\n\n{}", markers[0]))
        .ok_or_else(|| format!("no `{}` option in the instruction", markers[0]))?;
    let question = rest[..first].trim().to_string();
    if question.is_empty() {
        return Err("empty question".into());
    }
    let mut options = Vec::with_capacity(labels.len());
    let mut start = first + 2 + markers[0].len();
    for (i, m) in markers.iter().enumerate().skip(1) {
        let end = start
            + rest[start..]
                .find(m.as_str())
                .ok_or_else(|| format!("no `{m}` option after `{}`", markers[i - 1]))?;
        options.push(rest[start..end].trim().to_string());
        start = end + m.len();
    }
    let last = rest[start..].trim();
    // A further option that the format line does not announce would end up in the last one.
    let stem = task.label_stem().expect("multiple choice");
    let extra = marker(&format!("{stem}{}", labels.len() + 1));
    if last.contains(&extra) {
        return Err(format!(
            "the instruction has an `{extra}` option that `Answer format:` does not list"
        ));
    }
    options.push(last.to_string());
    if let Some(i) = options.iter().position(String::is_empty) {
        return Err(format!("option `{}` is empty", labels[i]));
    }
    Ok(ParsedQuestion {
        question,
        options,
        labels,
    })
}

/// lm-evaluation-harness's HellaSwag `preprocess`: drops ` [title]`/`[header]`-style
/// tags and collapses double spaces (a no-op on the cleaned `test_preprocessed.json`).
pub fn hellaswag_preprocess(text: &str) -> String {
    let text = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(open) = rest.find('[') {
        match rest[open..].find(']') {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_drops_wikihow_tags() {
        assert_eq!(
            hellaswag_preprocess("Care: [header] How to x [title] Obtain y [step] Do z."),
            "Care: How to x. Obtain y Do z."
        );
        assert_eq!(hellaswag_preprocess(" plain  text "), "plain text");
    }

    #[test]
    fn winogrande_has_no_blank_line_before_the_format() {
        let p = parse_instruction(
            Task::WinoGrande,
            "Please choose the correct answer to fill in the blank to complete the given sentence: A _ b.\n\nOption1: x y Option2: z Answer format: option1/option2",
        )
        .unwrap();
        assert_eq!(p.question, "A _ b.");
        assert_eq!(p.options, vec!["x y", "z"]);
        assert_eq!(p.labels, vec!["option1", "option2"]);
    }

    #[test]
    fn piqa_options_are_separated_by_blank_lines() {
        let p = parse_instruction(
            Task::Piqa,
            "Please choose the correct solution to the question: Goal?\n\nSolution1: one\n\nSolution2: two\n\nAnswer format: solution1/solution2",
        )
        .unwrap();
        assert_eq!(p.question, "Goal?");
        assert_eq!(p.options, vec!["one", "two"]);
    }

    #[test]
    fn bad_formats_are_refused() {
        let lead = Task::ArcEasy.lead_in();
        let e = parse_instruction(
            Task::ArcEasy,
            &format!("{lead}Q\n\nAnswer1: a Answer2: b\n\nAnswer format: option1/option2"),
        )
        .unwrap_err();
        assert!(e.contains("not a valid format"), "{e}");
        let e = parse_instruction(
            Task::ArcEasy,
            &format!("{lead}Q\n\nAnswer1: a Answer2: \n\nAnswer format: answer1/answer2"),
        )
        .unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = parse_instruction(
            Task::ArcEasy,
            &format!(
                "{lead}Q\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2"
            ),
        )
        .unwrap_err();
        assert!(e.contains("Answer3:"), "{e}");
        let e = parse_instruction(
            Task::ArcEasy,
            "Q\n\nAnswer1: a Answer2: b\n\nAnswer format: answer1/answer2",
        )
        .unwrap_err();
        assert!(e.contains("lead-in"), "{e}");
    }
}
