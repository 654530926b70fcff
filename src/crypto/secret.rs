//! A secret string: zeroised when dropped, `[redacted]` when printed.

use zeroize::Zeroizing;

/// Text that must never be logged or kept after use (credentials, tokens).
/// Its `Debug` and `Display` print `[redacted]`; its memory is overwritten
/// when it is dropped.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

/// Constant-time equality (the length is not hidden).
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq as _;
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for Secret {}

impl Secret {
    /// Wraps `text`.
    pub fn new(text: String) -> Self {
        Secret(Zeroizing::new(text))
    }

    /// The secret text, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Secret::new(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_content() {
        let secret = Secret::new("ghp_topsecret".into());
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&secret)), "Some([redacted])");
        assert_eq!(secret.expose(), "ghp_topsecret");
    }
}
