//! Policy files cut into parts at their `[[token]]` lines, each part walked on its own,
//! and the cache that lets a reload re-walk only the parts whose text changed.

use std::{collections::HashMap, path::PathBuf};

use super::compile::Walked;

/// One part of a file that starts at a `[[token]]` line, walked on its own.
#[derive(Debug)]
pub(super) struct Part {
    /// Byte range in its file.
    pub start: usize,
    pub end: usize,
    pub walked: Walked,
}

/// Policy files as last compiled, part by part, so that recompiling them re-walks only
/// what changed. The daemon keeps one across reloads; `rampart check` needs none.
#[derive(Debug, Default)]
pub struct PolicyCache {
    pub(super) files: HashMap<PathBuf, CachedFile>,
}

#[derive(Debug, Default)]
pub(super) struct CachedFile {
    pub text: String,
    pub parts: Vec<Part>,
}

/// Where the `[[token]]` tables of a file start, if it can be cut there: each part then
/// parses alone as it does within the file. Empty when it may not (a multi-line string
/// could hold such a line) or when there is no such line. A part's other headers are
/// checked once it is parsed (`walk_part`).
pub(super) fn token_cuts(text: &str) -> Vec<usize> {
    let b = text.as_bytes();
    if memchr::memmem::find(b, b"\"\"\"").is_some() || memchr::memmem::find(b, b"'''").is_some() {
        return Vec::new();
    }
    const HEADER: &[u8] = b"[[token]]";
    memchr::memmem::find_iter(b, HEADER)
        .filter(|&at| {
            let rest = &b[at + HEADER.len()..];
            let line_end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
            (at == 0 || b[at - 1] == b'\n') && rest[..line_end].iter().all(u8::is_ascii_whitespace)
        })
        .collect()
}

/// Bytes `a` and `b` share at their start.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[i..i + BLOCK] == b[i..i + BLOCK] {
        i += BLOCK;
    }
    i + a[i..n]
        .iter()
        .zip(&b[i..n])
        .take_while(|(x, y)| x == y)
        .count()
}

/// Bytes `a` and `b` share at their end.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let (a, b) = (&a[a.len() - n..], &b[b.len() - n..]);
    let mut i = 0;
    while i + BLOCK <= n && a[n - i - BLOCK..n - i] == b[n - i - BLOCK..n - i] {
        i += BLOCK;
    }
    i + a[..n - i]
        .iter()
        .rev()
        .zip(b[..n - i].iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

/// The parts of `text` cut at `cuts`, taken from `old` where the same text was a part
/// there too, walked afresh otherwise (on every CPU). None when a part holds something
/// besides tokens: then the file is walked whole.
///
/// The prefix and the suffix the two texts share are matched part by part, in order (no
/// hashing: a reload that changed one token of a million compares and moves); the parts
/// between, by their text.
pub(super) fn parts(
    text: &str,
    cuts: &[usize],
    old: Option<CachedFile>,
    walk_part: impl Fn(&str) -> Option<Walked> + Sync,
) -> Option<Vec<Part>> {
    let (old_text, mut old_parts) = old.map(|o| (o.text, o.parts)).unwrap_or_default();
    let (a, b) = (old_text.as_bytes(), text.as_bytes());
    let prefix = common_prefix(a, b);
    let suffix = common_suffix(a, b)
        .min(a.len() - prefix)
        .min(b.len() - prefix);
    let mut j = 0;
    let mut out = Vec::with_capacity(cuts.len());
    // Parts in neither, by their index in `out`.
    let mut middle = Vec::new();
    for (i, &start) in cuts.iter().enumerate() {
        let end = cuts.get(i + 1).copied().unwrap_or(text.len());
        // Where this part's text starts in the old file, if it is there unchanged.
        let was = if end <= prefix {
            Some(start)
        } else if start >= b.len() - suffix {
            Some(start + a.len() - b.len())
        } else {
            None
        };
        let mut walked = None;
        if let Some(was) = was {
            while j < old_parts.len() && old_parts[j].start < was {
                j += 1;
            }
            if let Some(p) = old_parts.get_mut(j) {
                if p.start == was && p.end - p.start == end - start {
                    walked = Some(std::mem::take(&mut p.walked));
                }
            }
        }
        if walked.is_none() {
            middle.push(out.len());
        }
        out.push(Part {
            start,
            end,
            walked: walked.unwrap_or_default(),
        });
    }
    // The old parts between the shared prefix and suffix, none of them taken above.
    let mut by_text: HashMap<&str, usize> = HashMap::new();
    if !middle.is_empty() {
        for (k, p) in old_parts.iter().enumerate() {
            if p.end > prefix && p.start < a.len() - suffix {
                by_text.entry(&old_text[p.start..p.end]).or_insert(k);
            }
        }
    }
    let mut todo = Vec::new();
    for i in middle {
        let part_text = &text[out[i].start..out[i].end];
        match by_text.remove(part_text) {
            Some(k) => out[i].walked = std::mem::take(&mut old_parts[k].walked),
            None => todo.push((i, part_text)),
        }
    }
    for (i, walked) in walk_all(&todo, walk_part) {
        out[i].walked = walked?;
    }
    Some(out)
}

/// `walk` over `(index, text)` pairs, on as many threads as there are CPUs when there is
/// enough to share; returns the results with their index.
fn walk_all<W: Send>(
    todo: &[(usize, &str)],
    walk: impl Fn(&str) -> Option<W> + Sync,
) -> Vec<(usize, Option<W>)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let one = |chunk: &[(usize, &str)]| -> Vec<(usize, Option<W>)> {
        chunk.iter().map(|&(i, t)| (i, walk(t))).collect()
    };
    if threads == 1 || todo.len() < 4096 {
        return one(todo);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = todo
            .chunks(todo.len().div_ceil(threads))
            .map(|chunk| s.spawn(|| one(chunk)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("walking a policy part does not panic"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use std::{
        path::Path,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;
    use crate::policy::{compile::walk_part, CompiledPolicy, Diagnostic};

    const HEAD: &str = "[[contract]]\nname = \"c\"\nstages = [{ after = \"0s\", rate = 5, burst = 10 }]\n\n\
                        [[contract]]\nname = \"d\"\nstages = [{ after = \"0s\", rate = 9, burst = 10 }]\n\n\
                        [[scope]]\nname = \"s\"\nmethods = [\"GET\"]\nprefix = \"/\"\n";

    fn token(i: usize, contract: &str) -> String {
        format!(
            "\n[[token]]\nfingerprint = \"{:032x}\"\ncontract = \"{contract}\"\nscopes = [\"s\"]\n",
            i + 1
        )
    }

    fn policy(n: usize, changed: Option<usize>) -> String {
        let mut text = String::from(HEAD);
        for i in 0..n {
            text.push_str(&token(i, if Some(i) == changed { "d" } else { "c" }));
        }
        text
    }

    /// Compiles `text` as `policy.toml` through `cache`.
    fn compile(
        text: &str,
        cache: Option<&mut PolicyCache>,
    ) -> Result<CompiledPolicy, Vec<Diagnostic>> {
        super::super::compile::compile(&[("policy.toml".into(), text.to_string())], cache)
    }

    /// How many parts `parts` walks to recut `new` after `old`.
    fn walks(old: &str, new: &str) -> usize {
        let count = AtomicUsize::new(0);
        let old = CachedFile {
            text: old.to_string(),
            parts: parts(old, &token_cuts(old), None, walk_part).unwrap(),
        };
        parts(new, &token_cuts(new), Some(old), |t| {
            count.fetch_add(1, Ordering::Relaxed);
            walk_part(t)
        })
        .unwrap();
        count.into_inner()
    }

    #[test]
    fn a_recompile_walks_only_the_parts_whose_text_changed() {
        let base = policy(10_000, None);
        assert_eq!(walks(&base, &base), 0);
        assert_eq!(walks(&base, &policy(10_000, Some(5_000))), 1);
        // Everything after it moved (a longer line above), nothing else changed.
        let longer = base.replacen("rate = 5,", "rate = 500,", 1);
        assert_eq!(walks(&base, &longer), 0);
        // A token removed, one added at the end: the new one, and the one before it (its
        // part now ends with the blank line before the new one).
        let edited = base.replacen(&token(10, "c"), "", 1) + &token(20_000, "c");
        assert_eq!(walks(&base, &edited), 2);
    }

    /// What the cache gives is what a fresh compile gives: tokens, and diagnostics at their
    /// lines after the text above them changed length.
    #[test]
    fn a_cached_recompile_is_a_fresh_compile() {
        let mut cache = PolicyCache::default();
        let first = policy(2_000, None);
        assert_eq!(
            compile(&first, Some(&mut cache)).unwrap(),
            compile(&first, None).unwrap()
        );
        let changed = format!("# a comment\n# and another\n{}", policy(2_000, Some(1_000)));
        let cached = compile(&changed, Some(&mut cache)).unwrap();
        assert_eq!(cached, compile(&changed, None).unwrap());
        assert_eq!(cached.tokens[1_000].info.contract, 1);

        // A mistake near the end, two lines further down than in the cached text, and a
        // duplicate of a token from the unchanged start.
        let broken = format!("# one more\n{changed}").replacen(
            "contract = \"c\"\nscopes = [\"s\"]\n",
            "contract = \"c\"\nscopes = [\"t\"]\n",
            1,
        ) + &token(3, "c");
        let errors = |r: Result<CompiledPolicy, Vec<Diagnostic>>| -> Vec<String> {
            r.unwrap_err().iter().map(ToString::to_string).collect()
        };
        let fresh = errors(compile(&broken, None));
        assert_eq!(errors(compile(&broken, Some(&mut cache))), fresh);
        assert_eq!(
            fresh,
            [
                "policy.toml:20:11: unknown scope `t`".to_string(),
                format!(
                    "policy.toml:10018:15: fingerprint {:032x} is already listed at policy.toml:33:15",
                    4
                ),
            ]
        );
    }

    /// A head that does not parse defines nothing: its error is reported, not one "unknown
    /// contract" per token; a broken token part is reported at its own line, with the rest.
    #[test]
    fn a_broken_part_is_reported_alone() {
        let head_broken = policy(500, None).replacen("rate = 5,", "rate = ,", 1);
        let e = compile(&head_broken, None).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].line, e[0].col), (3, 34), "{e:?}");

        let part_broken = policy(500, None).replacen(
            &format!("fingerprint = \"{:032x}\"", 300),
            "fingerprint = \"unterminated",
            1,
        ) + "\n[[token]]\nfingerprint = \"00000000000000000000000000000001\"\ncontract = \"c\"\nscopes = [\"s\"]\n";
        let e: Vec<String> = compile(&part_broken, None)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("policy.toml:1510:"), "{e:?}");
        assert!(
            e[1].contains("is already listed at policy.toml:15:15"),
            "{e:?}"
        );
    }

    /// Where cutting would read a file otherwise than whole, it is read whole.
    #[test]
    fn files_that_cannot_be_cut_are_read_whole() {
        // `token` as an inline array, then `[[token]]`: TOML refuses that.
        let inline = format!(
            "token = [{{ fingerprint = \"{:032x}\", contract = \"c\", scopes = [\"s\"] }}]\n{HEAD}{}",
            1,
            token(5, "c")
        );
        let e = compile(&inline, None).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].line, 15, "{e:?}");
        assert!(e[0].message.contains("duplicate key `token`"), "{e:?}");
        // A contract after the tokens, and a label with a `[[token]]` line inside.
        let mixed = format!(
            "{}\n[[contract]]\nname = \"late\"\nstages = [{{ after = \"0s\", rate = 1, burst = 1 }}]\n\n\
             [[token]]\nfingerprint = \"{:032x}\"\ncontract = \"late\"\nscopes = [\"s\"]\n\
             label = \"\"\"\n[[token]]\n\"\"\"\n",
            policy(3, None),
            99
        );
        let p = compile(&mixed, None).unwrap();
        assert_eq!(p.tokens.len(), 4);
        assert_eq!(p.tokens[3].info.contract, 2);
        assert_eq!(p.tokens[3].label.as_deref(), Some("[[token]]\n"));
        let late = policy(3, None) + "\n[[contract]]\nname = \"late\"\nstages = [{ after = \"0s\", rate = 1, burst = 1 }]\n";
        assert_eq!(
            compile(&late, None).unwrap().contract_index("late"),
            Some(2)
        );
        assert!(Path::new("policy.toml").is_relative());
    }
}
