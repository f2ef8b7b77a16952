//! LLM-Adapters' prompt templates, byte for byte (see DESIGN.md). Training and
//! evaluation differ: two spaces vs one after the header, a 16-space line vs an empty
//! one, and the evaluation prompt ends with 16 spaces.

const HEADER: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.";
const INDENT: &str = "                "; // 16 spaces

/// The text the model is trained on (`finetune.py`'s `generate_prompt`, no input), before
/// EOS. With `output == ""` it is the prompt part whose labels `train_on_inputs: false`
/// masks.
pub fn training_prompt(instruction: &str, output: &str) -> String {
    format!(
        "{HEADER}  \n\n{INDENT}### Instruction:\n{INDENT}{instruction}\n{INDENT}\n{INDENT}### Response:\n{INDENT}{output}"
    )
}

/// The prompt the model continues at evaluation (`commonsense_evaluate.py`).
pub fn evaluation_prompt(instruction: &str) -> String {
    format!("{HEADER} \n\n{INDENT}### Instruction:\n{INDENT}{instruction}\n\n{INDENT}### Response:\n{INDENT}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluation_prompt_matches_the_python_expression_of_design_md() {
        // "Below is ... the request. \n\n" + 16*" " + "### Instruction:\n" + 16*" " +
        // instruction + "\n\n" + 16*" " + "### Response:\n" + 16*" "
        let sp = " ".repeat(16);
        let expected = format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n{sp}### Instruction:\n{sp}Q?\n\n{sp}### Response:\n{sp}"
        );
        assert_eq!(evaluation_prompt("Q?"), expected);
    }

    #[test]
    fn training_prompt_has_two_spaces_and_a_line_of_sixteen() {
        let p = training_prompt("Q?", "the correct answer is true");
        let lines: Vec<&str> = p.split('\n').collect();
        assert!(lines[0].ends_with("request.  "));
        assert_eq!(lines[1], "");
        assert_eq!(lines[2], format!("{INDENT}### Instruction:"));
        assert_eq!(lines[3], format!("{INDENT}Q?"));
        assert_eq!(lines[4], INDENT);
        assert_eq!(lines[5], format!("{INDENT}### Response:"));
        assert_eq!(lines[6], format!("{INDENT}the correct answer is true"));
        assert_eq!(lines.len(), 7);
    }
}
