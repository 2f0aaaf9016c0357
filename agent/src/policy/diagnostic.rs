//! `file:line:col: message` diagnostics, shared by the configuration and policy parsers.

use std::{fmt, ops::Range, path::PathBuf};

/// One problem in a configuration or policy file, located the way editors and CI logs
/// understand (`file:line:col: message`, 1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based; 0 when the problem concerns the whole file (it could not be read).
    pub line: usize,
    /// 1-based, in characters; 0 together with `line`.
    pub col: usize,
    pub message: String,
}

impl Diagnostic {
    /// A problem with the file as a whole, such as not being readable.
    pub fn whole_file(file: impl Into<PathBuf>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: file.into(),
            line: 0,
            col: 0,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.col,
                self.message
            )
        }
    }
}

impl std::error::Error for Diagnostic {}

/// A file's text, to turn the byte spans the TOML parsers report into lines and columns.
/// The line starts are found once, on the first lookup: a policy with a million tokens
/// asks for a location per token, and scanning the text from its start each time made
/// compiling quadratic (32 000 tokens: 66 s).
#[derive(Clone, Debug)]
pub(crate) struct SourceText<'a> {
    pub path: &'a std::path::Path,
    pub text: &'a str,
    line_starts: std::cell::OnceCell<Vec<usize>>,
}

impl<'a> SourceText<'a> {
    pub fn new(path: &'a std::path::Path, text: &'a str) -> Self {
        SourceText {
            path,
            text,
            line_starts: std::cell::OnceCell::new(),
        }
    }

    /// A diagnostic at the start of `span` (or for the whole file without one).
    pub fn at(&self, span: Option<Range<usize>>, message: impl Into<String>) -> Diagnostic {
        match span {
            Some(span) => {
                let (line, col) = self.line_col(span.start);
                Diagnostic {
                    file: self.path.to_path_buf(),
                    line,
                    col,
                    message: message.into(),
                }
            }
            None => Diagnostic::whole_file(self.path, message),
        }
    }

    /// `file:line:col` of a byte offset, to point from one diagnostic at another definition.
    pub fn location(&self, offset: usize) -> String {
        let (line, col) = self.line_col(offset);
        format!("{}:{line}:{col}", self.path.display())
    }

    /// 1-based line and character column of a byte offset, by binary search over the
    /// line starts.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let starts = self.line_starts.get_or_init(|| line_starts(self.text));
        line_col_in(self.text, starts, offset)
    }
}

/// Byte offsets at which lines begin (the first is 0).
fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

fn line_col_in(text: &str, starts: &[usize], offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    // Spans from the parsers fall on character boundaries; stay safe if one does not.
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    // The last line start at or before `offset`.
    let line = starts.partition_point(|&s| s <= offset);
    let line_start = starts[line - 1];
    (line, text[line_start..offset].chars().count() + 1)
}

/// 1-based line and character column of a byte offset.
#[cfg(test)]
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    line_col_in(text, &line_starts(text), offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_become_one_based_lines_and_columns() {
        let text = "a = 1\nbé = 2\n\nc";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 4), (1, 5));
        assert_eq!(line_col(text, 6), (2, 1));
        // "bé = " is 6 bytes but 5 characters.
        assert_eq!(line_col(text, 12), (2, 6));
        assert_eq!(line_col(text, 15), (4, 1));
        assert_eq!(line_col(text, 999), (4, 2));
    }

    #[test]
    fn displays_like_a_compiler() {
        let src = SourceText::new(std::path::Path::new("p.toml"), "x\n  y");
        assert_eq!(src.at(Some(4..5), "bad").to_string(), "p.toml:2:3: bad");
        assert_eq!(src.at(None, "unreadable").to_string(), "p.toml: unreadable");
    }
}
