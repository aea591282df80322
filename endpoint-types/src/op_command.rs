//! An op's command line as argv: split the way a POSIX shell would split it (quotes and
//! escapes), but nothing a shell would *do* is done. Shared by the agent, which runs exactly
//! this argv, and the gateway, which shows it to the approver and puts it in the statement the
//! approver signs ([`crate::approval::DecidedContent::OpCommand`]).

use crate::control::OpTool;

/// Why a command line is not one argv for its tool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("the command is empty")]
    EmptyCommand,
    #[error("the command has {what} at character {at}")]
    BadQuoting { what: &'static str, at: usize },
    #[error("the command uses `{what}` at character {at}, which needs a shell; ops run one program directly, never through a shell")]
    ShellSyntax { what: String, at: usize },
    #[error("this is a `{expected}` op, but the command starts with `{got}`", expected = expected.as_str())]
    WrongTool { expected: OpTool, got: String },
}

/// Splits `command` into argv POSIX-shell-style, without a shell.
///
/// Understood: blanks between words, `'…'` (everything literal), `"…"` (backslash escapes only
/// `\ " $` and a backquote), backslash outside quotes, backslash-newline (joins lines), and
/// trailing blanks or newlines. Refused, because a shell would act on them and we do not:
/// unquoted `; | & > < ( )` and newline, a backquote anywhere outside single quotes, `$`
/// followed by anything outside single quotes (`$(…)`, `${…}`, `$VAR`, `$1`), and `#` starting
/// a word. Passed on literally, because a shell usually would too: `* ? [ ] { } ~ = !`.
pub fn parse_command(tool: OpTool, command: &str) -> Result<Vec<String>, CommandError> {
    let chars: Vec<char> = command
        .trim_end_matches([' ', '\t', '\n', '\r'])
        .chars()
        .collect();
    let shell = |what: &str, at: usize| {
        Err(CommandError::ShellSyntax {
            what: what.to_string(),
            at: at + 1,
        })
    };
    let quoting =
        |what: &'static str, at: usize| Err(CommandError::BadQuoting { what, at: at + 1 });
    let dollar = |i: usize, in_dq: bool| -> Option<String> {
        match chars.get(i + 1) {
            None | Some(' ' | '\t' | '\n') => None,
            Some('"') if in_dq => None,
            Some(&c @ ('(' | '{')) => Some(format!("${c}")),
            Some(&c) if c.is_ascii_alphanumeric() || c == '_' => Some(
                chars[i..]
                    .iter()
                    .take_while(|c| **c == '$' || c.is_ascii_alphanumeric() || **c == '_')
                    .collect(),
            ),
            Some(&c) => Some(format!("${c}")),
        }
    };
    let (mut words, mut cur, mut in_word, mut i) = (Vec::new(), String::new(), false, 0);
    while i < chars.len() {
        match chars[i] {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\0' => return quoting("a NUL character", i),
            '\\' => match chars.get(i + 1) {
                None => return quoting("a backslash with nothing after it", i),
                Some('\n') => i += 1,
                Some(&c) => {
                    cur.push(c);
                    in_word = true;
                    i += 1;
                }
            },
            '\'' => {
                let Some(len) = chars[i + 1..].iter().position(|c| *c == '\'') else {
                    return quoting("an unterminated single quote", i);
                };
                cur.extend(&chars[i + 1..i + 1 + len]);
                in_word = true;
                i += len + 1;
            }
            '"' => {
                let open = i;
                in_word = true;
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return quoting("an unterminated double quote", open),
                        Some('"') => break,
                        Some('\\') => match chars.get(i + 1) {
                            Some(&c @ ('\\' | '"' | '$' | '`')) => {
                                cur.push(c);
                                i += 1;
                            }
                            Some('\n') => i += 1,
                            _ => cur.push('\\'),
                        },
                        Some('`') => return shell("`", i),
                        Some('$') if let Some(what) = dollar(i, true) => return shell(&what, i),
                        Some(&c) => cur.push(c),
                    }
                    i += 1;
                }
            }
            '\n' => return shell("a newline", i),
            c @ (';' | '|' | '&' | '>' | '<' | '(' | ')' | '`') => return shell(&c.to_string(), i),
            '$' if let Some(what) = dollar(i, false) => return shell(&what, i),
            '#' if !in_word => return shell("#", i),
            c => {
                cur.push(c);
                in_word = true;
            }
        }
        i += 1;
    }
    if in_word {
        words.push(cur);
    }
    match words.first() {
        None => Err(CommandError::EmptyCommand),
        Some(first) if first != tool.as_str() => Err(CommandError::WrongTool {
            expected: tool,
            got: first.clone(),
        }),
        Some(_) => Ok(words),
    }
}
