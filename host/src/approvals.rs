//! Which tool calls need a person's approval, and for how long a call
//! waits for one (`[approvals]`; docs/architecture.md, "Approvals").
//!
//! The operator's rules only add requirements: a call needs approval when
//! any rule matches it, so more rules mean more approval, never less.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `[approvals]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// How long a call waits for an answer before it is rejected as timed
    /// out.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How often each host looks for calls whose time ran out.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// `[[approvals.rules]]`: a call needs approval if any rule matches it.
    pub rules: Vec<ApprovalRule>,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(24 * 3600),
            check_interval: Duration::from_secs(1),
            rules: Vec::new(),
        }
    }
}

/// One rule: a tool, by name (`*` for every tool), and optionally
/// conditions on its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRule {
    pub tool: String,
    /// JSON pointer into the arguments (`/path`, `/options/mode`) to a glob
    /// (`*` any run of characters, `?` one character). Every condition must
    /// hold. A string is matched as it is, any other value as its JSON
    /// text; a missing value never matches.
    #[serde(default)]
    pub when: BTreeMap<String, String>,
}

impl ApprovalsConfig {
    /// Checks the rules once, at start-up.
    pub fn validate(&self) -> Result<(), String> {
        for rule in &self.rules {
            rule.validate("[[approvals.rules]]")?;
        }
        if self.timeout.is_zero() || self.check_interval.is_zero() {
            return Err("[approvals] timeout and check_interval must be more than zero".into());
        }
        Ok(())
    }

    /// Whether a call of `tool` with `arguments` needs approval by the
    /// operator's rules (a plugin's own rules are checked beside these).
    pub fn needs_approval(&self, tool: &str, arguments: &Value) -> bool {
        self.rules.iter().any(|rule| rule.matches(tool, arguments))
    }
}

impl ApprovalRule {
    /// Checks the rule once, when it is read; `section` names where it was
    /// written, for the error.
    pub fn validate(&self, section: &str) -> Result<(), String> {
        if self.tool.is_empty() {
            return Err(format!("an {section} entry names no tool"));
        }
        for pointer in self.when.keys() {
            if !pointer.starts_with('/') {
                return Err(format!(
                    "{section} for {:?}: {pointer:?} is not a JSON pointer (it starts with /)",
                    self.tool
                ));
            }
        }
        Ok(())
    }

    /// Whether the rule asks for approval of a call of `tool` with
    /// `arguments`.
    pub fn matches(&self, tool: &str, arguments: &Value) -> bool {
        (self.tool == "*" || self.tool == tool)
            && self
                .when
                .iter()
                .all(|(pointer, pattern)| match arguments.pointer(pointer) {
                    None => false,
                    Some(Value::String(text)) => glob(pattern, text),
                    Some(other) => glob(pattern, &other.to_string()),
                })
    }
}

/// `*` matches any run of characters, `?` any one; the rest matches itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it was tried from.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn globs_match_runs_and_single_characters() {
        assert!(glob("/etc/*", "/etc/passwd"));
        assert!(glob("*", ""));
        assert!(glob("a?c", "abc"));
        assert!(glob("*.txt", "notes.txt"));
        assert!(glob("*1*", "1+1"));
        assert!(!glob("/etc/*", "/home/etc/x"));
        assert!(!glob("a?c", "ac"));
        assert!(!glob("abc", "abcd"));
    }

    #[test]
    fn a_rule_matches_its_tool_and_every_condition() {
        let config: ApprovalsConfig = toml::from_str(
            r#"
            [[rules]]
            tool = "delete_file"
            [[rules]]
            tool = "write_file"
            when = { "/path" = "/etc/*", "/mode" = "overwrite" }
            [[rules]]
            tool = "*"
            when = { "/count" = "1??" }
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        assert!(config.needs_approval("delete_file", &json!({})));
        assert!(config.needs_approval(
            "write_file",
            &json!({"path": "/etc/hosts", "mode": "overwrite"})
        ));
        assert!(!config.needs_approval("write_file", &json!({"path": "/etc/hosts"})));
        assert!(!config.needs_approval(
            "write_file",
            &json!({"path": "/tmp/x", "mode": "overwrite"})
        ));
        assert!(config.needs_approval("anything", &json!({"count": 150})));
        assert!(!config.needs_approval("anything", &json!({"count": 15})));
        assert!(!config.needs_approval("calculator", &json!({"expression": "1+1"})));
        assert!(!ApprovalsConfig::default().needs_approval("delete_file", &json!({})));
    }

    #[test]
    fn a_condition_must_be_a_json_pointer() {
        let config = ApprovalsConfig {
            rules: vec![ApprovalRule {
                tool: "x".into(),
                when: [("path".to_owned(), "*".to_owned())].into(),
            }],
            ..ApprovalsConfig::default()
        };
        assert!(config.validate().unwrap_err().contains("JSON pointer"));
    }
}
