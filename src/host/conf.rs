//! Editing libvirt-style `key = value` configuration files (`qemu.conf`, `libvirtd.conf`) in
//! place: set a few keys, keep every other line and comment as it was.
//!
//! For each key to set:
//! 1. Every active line `key = ...` gets the new value (indentation kept); a line that already
//!    has it is left byte for byte.
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

/// The value of the active `key` line, if any (the last one wins, as in libvirt).
pub fn get(text: &str, key: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| active_value(line, key))
        .next_back()
        .map(|v| strip_comment(v).to_string())
}

/// `text` with every setting applied.
pub fn apply(text: &str, settings: &[Setting]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut appended: Vec<String> = Vec::new();
    for setting in settings {
        let wanted = format!("{} = {}", setting.key, setting.value);
        let mut found = false;
        for line in lines.iter_mut() {
            if let Some(current) = active_value(line, &setting.key) {
                found = true;
                if strip_comment(current) != setting.value {
                    let indent: String = line.chars().take_while(|c| c.is_whitespace()).collect();
                    *line = format!("{indent}{wanted}");
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
            Some(at) => lines.insert(at + 1, wanted),
            None => appended.push(wanted),
        }
    }
    if !appended.is_empty() {
        if lines.last().is_some_and(|l| !l.trim().is_empty()) {
            lines.push(String::new());
        }
        lines.push(APPENDED_MARKER.to_string());
        lines.extend(appended);
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// The value part of `line` when it is an active `key = value` line for `key`.
fn active_value<'l>(line: &'l str, key: &str) -> Option<&'l str> {
    let rest = line.trim_start().strip_prefix(key)?;
    let rest = rest.trim_start().strip_prefix('=')?;
    Some(rest.trim())
}

/// True for `#key = ...` / `# key = ...` lines.
fn commented_example(line: &str, key: &str) -> bool {
    line.trim_start()
        .strip_prefix('#')
        .is_some_and(|rest| active_value(rest, key).is_some())
}

/// A value without a trailing `# comment` (outside quotes).
fn strip_comment(value: &str) -> &str {
    let mut in_quotes = false;
    for (i, c) in value.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            '#' if !in_quotes => return value[..i].trim_end(),
            _ => {}
        }
    }
    value.trim_end()
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
}
