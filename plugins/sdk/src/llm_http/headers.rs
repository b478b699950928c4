//! Response headers as the host hands them over.

/// Response headers, looked up without regard to case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(pairs.into_iter().collect())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_ignore_case() {
        let headers = Headers::from_pairs([("Retry-After".into(), "3".into())]);
        assert_eq!(headers.get("retry-after"), Some("3"));
        assert_eq!(headers.get("content-type"), None);
    }
}
