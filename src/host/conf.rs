//! Editing libvirt-style `key = value` configuration files (`qemu.conf`, `libvirtd.conf`) in
//! place: set a few keys, keep every other line and comment as it was.
//!
//! The file is edited as bytes, one `\n`-terminated line at a time: a line we do not set is
//! kept byte for byte, whatever its encoding (a Latin-1 comment, a `\r\n` ending).
//!
//! For each key to set:
//! 1. Every active line `key = ...` gets the new value (indentation and a `\r` ending kept); a
//!    line that already has it is left byte for byte. A string in single quotes is the same
//!    value as in double quotes (libvirt reads both), so `auth_tls = 'none'` is left alone.
//! 2. Without an active line, the new line goes right after the last commented-out example
//!    (`#key = ...`), where the stock files document it.
//! 3. Without either, it is appended at the end, under a one-line marker comment.
//!
//! Applying the same settings twice gives the same text (idempotent).

/// The comment put above settings appended to the end of a file.
pub const APPENDED_MARKER: &str = "# Set by qemu-tls-migrate host secure";

/// A `key = value` setting, the value as written in the file (strings with their quotes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: String,
    pub value: String,
}

/// Parses the active `key = value` lines of a template (comments and blank lines skipped).
pub fn parse_settings(text: &str) -> Vec<Setting> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let (key, value) = line.split_once('=')?;
            Some(Setting {
                key: key.trim().to_string(),
                value: value.trim().to_string(),
            })
        })
        .collect()
}

/// The value of the active `key` line, if any (the last one wins, as in libvirt), without a
/// trailing comment.
pub fn get(text: &str, key: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| active_value(line.as_bytes(), key))
        .next_back()
        .map(|v| String::from_utf8_lossy(strip_comment(v)).into_owned())
}

/// True when two values as written are the same to libvirt: equal, or the same string in
/// single and double quotes.
pub fn same_value(a: &str, b: &str) -> bool {
    same_value_bytes(a.as_bytes(), b.as_bytes())
}

/// A string value without its quotes (single or double); anything else as written.
pub fn unquoted(value: &str) -> &str {
    match unquote(value.as_bytes()) {
        Some(_) => &value[1..value.len() - 1],
        None => value,
    }
}

/// `text` with every setting applied.
pub fn apply(text: &str, settings: &[Setting]) -> String {
    // Only whole lines and ASCII are inserted, so valid UTF-8 stays valid.
    String::from_utf8_lossy(&apply_bytes(text.as_bytes(), settings)).into_owned()
}

/// `text` (any bytes) with every setting applied; lines not set are kept byte for byte.
pub fn apply_bytes(text: &[u8], settings: &[Setting]) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = text.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
    if text.is_empty() || text.ends_with(b"\n") {
        // The empty piece after the last newline is not a line.
        lines.pop();
    }
    let file_crlf = lines.first().is_some_and(|l| l.ends_with(b"\r"));
    let mut appended: Vec<Vec<u8>> = Vec::new();
    for setting in settings {
        let wanted = format!("{} = {}", setting.key, setting.value).into_bytes();
        let mut found = false;
        for line in lines.iter_mut() {
            let Some(current) = active_value(line, &setting.key) else {
                continue;
            };
            found = true;
            if !same_value_bytes(strip_comment(current), setting.value.as_bytes()) {
                let indent = line.iter().take_while(|b| b.is_ascii_whitespace()).count();
                let crlf = line.ends_with(b"\r");
                *line = [&line[..indent], &wanted].concat();
                if crlf {
                    line.push(b'\r');
                }
            }
        }
        if found {
            continue;
        }
        let example = lines
            .iter()
            .rposition(|line| commented_example(line, &setting.key));
        match example {
            Some(at) => {
                let crlf = lines[at].ends_with(b"\r");
                lines.insert(at + 1, with_ending(wanted, crlf));
            }
            None => appended.push(with_ending(wanted, file_crlf)),
        }
    }
    if !appended.is_empty() {
        if lines
            .last()
            .is_some_and(|l| !l.iter().all(u8::is_ascii_whitespace))
        {
            lines.push(with_ending(Vec::new(), file_crlf));
        }
        lines.push(with_ending(APPENDED_MARKER.as_bytes().to_vec(), file_crlf));
        lines.extend(appended);
    }
    let mut out = lines.join(&b'\n');
    out.push(b'\n');
    out
}

fn with_ending(mut line: Vec<u8>, crlf: bool) -> Vec<u8> {
    if crlf {
        line.push(b'\r');
    }
    line
}

/// The value part of `line` when it is an active `key = value` line for `key`.
fn active_value<'l>(line: &'l [u8], key: &str) -> Option<&'l [u8]> {
    let rest = line.trim_ascii_start().strip_prefix(key.as_bytes())?;
    let rest = rest.trim_ascii_start().strip_prefix(b"=")?;
    Some(rest.trim_ascii())
}

/// True for `#key = ...` / `# key = ...` lines.
fn commented_example(line: &[u8], key: &str) -> bool {
    line.trim_ascii_start()
        .strip_prefix(b"#")
        .is_some_and(|rest| active_value(rest, key).is_some())
}

/// A value without a trailing `# comment` (outside single or double quotes).
fn strip_comment(value: &[u8]) -> &[u8] {
    let mut quote: Option<u8> = None;
    for (i, &c) in value.iter().enumerate() {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, b'"' | b'\'') => quote = Some(c),
            (None, b'#') => return value[..i].trim_ascii_end(),
            (None, _) => {}
        }
    }
    value.trim_ascii_end()
}

/// The inside of a string in single or double quotes.
fn unquote(value: &[u8]) -> Option<&[u8]> {
    match value {
        [q @ (b'"' | b'\''), inner @ .., last] if last == q => Some(inner),
        _ => None,
    }
}

fn same_value_bytes(a: &[u8], b: &[u8]) -> bool {
    a == b || matches!((unquote(a), unquote(b)), (Some(x), Some(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(key: &str, value: &str) -> Setting {
        Setting {
            key: key.to_string(),
            value: value.to_string(),
        }
    }

    #[test]
    fn sets_after_commented_example_and_keeps_the_rest() {
        let text = "# top comment\n#listen_tls = 0\nunix_sock_group = \"libvirt\"\n";

        let out = apply(text, &[s("listen_tls", "1")]);

        assert_eq!(
            out,
            "# top comment\n#listen_tls = 0\nlisten_tls = 1\nunix_sock_group = \"libvirt\"\n"
        );
    }

    #[test]
    fn replaces_active_value_keeping_indent_and_appends_unknown() {
        let text = "  listen_tcp = 1\nother = 2";

        let out = apply(text, &[s("listen_tcp", "0"), s("tls_port", "\"16514\"")]);

        assert_eq!(
            out,
            format!("  listen_tcp = 0\nother = 2\n\n{APPENDED_MARKER}\ntls_port = \"16514\"\n")
        );
    }

    #[test]
    fn applying_twice_changes_nothing() {
        let text = "#listen_tls = 0\nfoo = 1 # note\n";
        let settings = [
            s("listen_tls", "1"),
            s("auth_tls", "\"none\""),
            s("foo", "1"),
        ];

        let once = apply(text, &settings);
        let twice = apply(&once, &settings);

        assert_eq!(once, twice);
        assert!(once.contains("foo = 1 # note"));
    }

    #[test]
    fn get_reads_the_last_active_value() {
        let text = "#a = 0\na = 1\na = 2 # x\n";

        assert_eq!(get(text, "a").as_deref(), Some("2"));
        assert_eq!(get(text, "b"), None);
    }

    #[test]
    fn key_prefix_does_not_match_longer_key() {
        let text = "listen_tls_extra = 5\n";

        let out = apply(text, &[s("listen_tls", "1")]);

        assert!(out.starts_with("listen_tls_extra = 5\n"), "{out}");
        assert!(out.ends_with("listen_tls = 1\n"), "{out}");
    }

    #[test]
    fn single_quoted_value_equal_to_the_wanted_one_is_left_as_is() {
        let text = "auth_tls = 'none' # certs only\nuser = 'qemu'\n";

        let out = apply(text, &[s("auth_tls", "\"none\"")]);

        assert_eq!(out, text);
    }

    #[test]
    fn single_quoted_value_of_a_key_we_set_is_replaced_not_duplicated() {
        let text = "tls_port = '16515'\nlisten_addr = '0.0.0.0'\n";

        let out = apply(text, &[s("tls_port", "\"16514\"")]);

        assert_eq!(out, "tls_port = \"16514\"\nlisten_addr = '0.0.0.0'\n");
    }

    #[test]
    fn hash_inside_single_quotes_is_not_a_comment() {
        let text = "a = 'x#y' # note\n";

        assert_eq!(get(text, "a").as_deref(), Some("'x#y'"));
    }

    #[test]
    fn crlf_line_endings_are_kept() {
        let text = "a = 1\r\nb = 2\r\n";

        let out = apply(text, &[s("b", "3")]);

        assert_eq!(out, "a = 1\r\nb = 3\r\n");
    }

    #[test]
    fn non_utf8_bytes_are_kept_byte_for_byte() {
        let text = b"# f\xfcr host-a\nuser = 'qemu' # \xff\n#listen_tls = 0\n";

        let out = apply_bytes(text, &[s("listen_tls", "1")]);

        assert_eq!(
            out,
            b"# f\xfcr host-a\nuser = 'qemu' # \xff\n#listen_tls = 0\nlisten_tls = 1\n"
        );
    }
}
