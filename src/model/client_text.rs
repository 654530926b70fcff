//! The strings a client describes its session with, kept in one allocation.
//!
//! Every live session holds them for its whole life and reads them only to
//! answer a view, so they share one heap string with the lengths of the
//! first three beside it instead of four boxed strings: 24 bytes inline
//! instead of 64, and one allocation instead of four. The saving matters
//! because a session's actor is one tokio task, whose cell is allocated in
//! steps of 128 bytes (see the size test in `engine::session`).
//!
//! The first three are at most 255 characters each (the API's limit), so
//! their lengths fit 2 bytes each; a longer one is refused ([`TooLong`]),
//! never cut.

use std::fmt;

/// `edge_mcp_id`, `client_name`, `client_version` and the connection
/// metadata (compact JSON object text) of one session.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientText {
    /// The four texts back to back.
    text: Box<str>,
    /// The byte lengths of the first three.
    lens: [u16; 3],
    /// Bit 0: a client name is given; bit 1: a client version is given.
    present: u8,
}

/// One of the first three texts is over 65,535 bytes: the API never
/// accepts one, so only a damaged or foreign record has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} is longer than 65535 bytes")]
pub struct TooLong(pub &'static str);

const NAME: u8 = 1;
const VERSION: u8 = 2;

impl ClientText {
    /// Joins the four texts.
    pub fn new(
        edge_mcp_id: &str,
        client_name: Option<&str>,
        client_version: Option<&str>,
        metadata: &str,
    ) -> Result<Self, TooLong> {
        let name = client_name.unwrap_or("");
        let version = client_version.unwrap_or("");
        let mut lens = [0u16; 3];
        let parts = [
            ("edge_mcp_id", edge_mcp_id),
            ("client_name", name),
            ("client_version", version),
        ];
        for (len, (field, part)) in lens.iter_mut().zip(parts) {
            *len = u16::try_from(part.len()).map_err(|_| TooLong(field))?;
        }
        let mut text =
            String::with_capacity(edge_mcp_id.len() + name.len() + version.len() + metadata.len());
        for part in [edge_mcp_id, name, version, metadata] {
            text.push_str(part);
        }
        let present = if client_name.is_some() { NAME } else { 0 }
            | if client_version.is_some() { VERSION } else { 0 };
        Ok(ClientText {
            text: text.into_boxed_str(),
            lens,
            present,
        })
    }

    fn part(&self, index: usize) -> &str {
        let start: usize = self.lens[..index].iter().map(|&l| usize::from(l)).sum();
        let end = self
            .lens
            .get(index)
            .map_or(self.text.len(), |&l| start + usize::from(l));
        &self.text[start..end]
    }

    /// The edge-mcp instance that opened the session.
    pub fn edge_mcp_id(&self) -> &str {
        self.part(0)
    }

    /// The client's display name, if it gave one.
    pub fn client_name(&self) -> Option<&str> {
        (self.present & NAME != 0).then(|| self.part(1))
    }

    /// The client's version string, if it gave one.
    pub fn client_version(&self) -> Option<&str> {
        (self.present & VERSION != 0).then(|| self.part(2))
    }

    /// The connection metadata, a JSON object as compact text.
    pub fn metadata(&self) -> &str {
        self.part(3)
    }

    /// The same texts with those given replaced (a PATCH).
    pub fn with(
        &self,
        client_name: Option<&str>,
        client_version: Option<&str>,
        metadata: Option<&str>,
    ) -> Result<Self, TooLong> {
        ClientText::new(
            self.edge_mcp_id(),
            client_name.or(self.client_name()),
            client_version.or(self.client_version()),
            metadata.unwrap_or(self.metadata()),
        )
    }
}

impl fmt::Debug for ClientText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientText")
            .field("edge_mcp_id", &self.edge_mcp_id())
            .field("client_name", &self.client_name())
            .field("client_version", &self.client_version())
            .field("metadata", &self.metadata())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_four_texts_come_back_as_given() {
        let text = ClientText::new("edge-1", Some("Claude"), Some("1.2"), r#"{"a":1}"#).unwrap();
        assert_eq!(text.edge_mcp_id(), "edge-1");
        assert_eq!(text.client_name(), Some("Claude"));
        assert_eq!(text.client_version(), Some("1.2"));
        assert_eq!(text.metadata(), r#"{"a":1}"#);
    }

    #[test]
    fn absent_and_empty_names_differ() {
        let text = ClientText::new("", None, Some(""), "{}").unwrap();
        assert_eq!(text.edge_mcp_id(), "");
        assert_eq!(text.client_name(), None);
        assert_eq!(text.client_version(), Some(""));
        assert_eq!(text.metadata(), "{}");
    }

    #[test]
    fn a_patch_replaces_only_what_it_gives() {
        let text = ClientText::new("edge", Some("ñame"), None, "{}").unwrap();
        let patched = text.with(None, Some("2.0"), Some(r#"{"b":"é"}"#)).unwrap();
        assert_eq!(patched.edge_mcp_id(), "edge");
        assert_eq!(patched.client_name(), Some("ñame"));
        assert_eq!(patched.client_version(), Some("2.0"));
        assert_eq!(patched.metadata(), r#"{"b":"é"}"#);
        assert_eq!(text.with(None, None, None).unwrap(), text);
    }

    #[test]
    fn an_overlong_text_is_refused_not_cut() {
        let long = "x".repeat(70_000);
        assert_eq!(
            ClientText::new("e", Some(&long), None, "{}"),
            Err(TooLong("client_name"))
        );
        // The metadata has no length of its own: it is the rest.
        let text = ClientText::new("e", None, None, &long).unwrap();
        assert_eq!(text.metadata().len(), 70_000);
    }
}
