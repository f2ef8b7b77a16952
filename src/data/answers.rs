//! `finetune.data_format: answers`: an LLM-Adapters item as natural text, the question
//! with its correct answer written out, instead of LLM-Adapters' instruction prompt and
//! `the correct answer is answer2`. Recovery data that looks like the text a language
//! model was trained on, and like what the `content` protocol scores.
//!
//! For training sets only: written out from a task's test file, the text would hold the
//! very answers evaluation asks for (`finetune` refuses files named like the test files,
//! see [`super::tasks::is_test_file`]).

use super::instructions::InstructionItem;
use super::options::{hellaswag_preprocess, parse_instruction};
use super::tasks::Task;

/// `output` of every LLM-Adapters item: this, then the gold label.
const OUTPUT_PREFIX: &str = "the correct answer is ";

/// The item as natural text, by the task its instruction's lead-in names
/// ([`Task::detect`]). The error says what is wrong (the caller adds file and item).
pub fn answer_text(item: &InstructionItem) -> Result<String, String> {
    let task = Task::detect(&item.instruction).ok_or_else(|| {
        "the instruction starts with none of the commonsense tasks' lead-ins; \
         `data_format: answers` converts only their items (use `data_format: instructions`)"
            .to_string()
    })?;
    let parsed = parse_instruction(task, &item.instruction)?;
    let gold = gold_label(item)?;
    let Some(index) = parsed.labels.iter().position(|l| *l == gold) else {
        return Err(format!(
            "answer `{gold}` is not one the question allows (Answer format: {})",
            parsed.labels.join("/")
        ));
    };
    let question = &parsed.question;
    Ok(match task {
        Task::BoolQ => boolq(question, gold == "true"),
        Task::HellaSwag => hellaswag(question, &parsed.options[index]),
        Task::WinoGrande => winogrande(question, &parsed.options[index])?,
        // PIQA: the goal, then its solution. SIQA: context and question (already one
        // text in the instruction), then the answer. ARC, OpenBookQA: the question, then
        // the answer.
        Task::Piqa | Task::SocialIqa | Task::ArcEasy | Task::ArcChallenge | Task::OpenBookQa => {
            question_then_answer(question, &parsed.options[index])
        }
    })
}

/// The gold label: `answer`, or what `output` says after `the correct answer is `.
fn gold_label(item: &InstructionItem) -> Result<&str, String> {
    if let Some(answer) = &item.answer {
        return Ok(answer.trim());
    }
    item.output
        .strip_prefix(OUTPUT_PREFIX)
        .map(str::trim)
        .ok_or_else(|| {
            format!(
                "no `answer` field, and `output` does not start with `{OUTPUT_PREFIX}`: \
                 cannot tell the correct answer"
            )
        })
}

/// BoolQ (LLM-Adapters keeps no passage): the question as a sentence, then `Yes.` or
/// `No.`.
fn boolq(question: &str, yes: bool) -> String {
    let mut q = capitalized(question);
    if !q.ends_with('?') {
        q.push('?');
    }
    format!("{q} {}", if yes { "Yes." } else { "No." })
}

/// HellaSwag: the context continued by the correct ending, both cleaned as
/// lm-evaluation-harness cleans them.
fn hellaswag(context: &str, ending: &str) -> String {
    format!(
        "{} {}",
        hellaswag_preprocess(context),
        hellaswag_preprocess(ending)
    )
}

/// WinoGrande: the sentence with its blank `_` filled by the correct option.
fn winogrande(sentence: &str, option: &str) -> Result<String, String> {
    if !sentence.contains('_') {
        return Err("the WinoGrande sentence has no `_` blank to fill".into());
    }
    Ok(sentence.replacen('_', option, 1))
}

/// `question` followed by `answer` as running text. After `?`, `.` or `!` the answer
/// starts a sentence (capital first letter); otherwise it continues the question's
/// sentence (OpenBookQA's `The sun is responsible for` …). A full stop ends the text
/// unless it already ends with `.`, `?` or `!`.
fn question_then_answer(question: &str, answer: &str) -> String {
    let starts_sentence = question.ends_with(['?', '.', '!']);
    let answer = if starts_sentence {
        capitalized(answer)
    } else {
        answer.to_string()
    };
    let mut text = format!("{question} {answer}");
    if !text.ends_with(['.', '?', '!']) {
        text.push('.');
    }
    text
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(instruction: &str, answer: Option<&str>, output: &str) -> InstructionItem {
        InstructionItem {
            instruction: instruction.into(),
            input: String::new(),
            output: output.into(),
            answer: answer.map(String::from),
        }
    }

    #[test]
    fn the_gold_label_comes_from_answer_or_output() {
        let q = "Please answer the following question with true or false, question: is it?\n\nAnswer format: true/false";
        let from_output = item(q, None, "the correct answer is false");
        assert_eq!(answer_text(&from_output).unwrap(), "Is it? No.");
        let e = answer_text(&item(q, None, "false")).unwrap_err();
        assert!(e.contains("cannot tell"), "{e}");
        let e = answer_text(&item(q, Some("maybe"), "")).unwrap_err();
        assert!(e.contains("`maybe`"), "{e}");
    }

    #[test]
    fn other_instructions_are_refused() {
        let e = answer_text(&item("Translate: hi", Some("x"), "")).unwrap_err();
        assert!(e.contains("data_format: instructions"), "{e}");
    }

    #[test]
    fn answers_continue_or_start_a_sentence() {
        assert_eq!(question_then_answer("Why?", "because."), "Why? Because.");
        assert_eq!(
            question_then_answer("Plants need", "water"),
            "Plants need water."
        );
        assert_eq!(
            question_then_answer("Pick one.", "this one!"),
            "Pick one. This one!"
        );
    }
}
