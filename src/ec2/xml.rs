//! Just enough XML for EC2's Query-API answers: a bounded element tree (local names,
//! text with the predefined and numeric entities decoded) built with `xmlparser`.
//! EC2 answers are small, flat documents; anything deeper or larger than the bounds
//! below is refused instead of being followed.

use xmlparser::{ElementEnd, Token, Tokenizer};

/// Deeper documents are refused (EC2's answers are about 6 levels deep).
const MAX_DEPTH: usize = 32;
/// More elements than this are refused (a page of ENIs is a few hundred).
const MAX_ELEMENTS: usize = 100_000;

/// One element: its local name (no namespace prefix), its text, its children in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub text: String,
    pub children: Vec<Element>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("not well-formed XML: {0}")]
    Syntax(String),
    #[error("the XML document has no root element")]
    Empty,
    #[error("the XML document is deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("the XML document has more than {MAX_ELEMENTS} elements")]
    TooLarge,
}

impl Element {
    /// The first child called `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The trimmed text of the first child called `name`, when it has any.
    pub fn text_of(&self, name: &str) -> Option<&str> {
        self.child(name)
            .map(|c| c.text.trim())
            .filter(|t| !t.is_empty())
    }

    /// The `<item>`s of the child set called `set` (EC2's list shape), none if absent.
    pub fn items<'a>(&'a self, set: &str) -> impl Iterator<Item = &'a Element> + 'a {
        self.child(set)
            .into_iter()
            .flat_map(|s| s.children.iter().filter(|c| c.name == "item"))
    }
}

/// Parses a whole document into its root element.
pub fn parse(text: &str) -> Result<Element, XmlError> {
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut count = 0usize;
    for token in Tokenizer::from(text) {
        let token = token.map_err(|e| XmlError::Syntax(e.to_string()))?;
        match token {
            Token::ElementStart { local, .. } => {
                if root.is_some() {
                    return Err(XmlError::Syntax("content after the root element".into()));
                }
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(XmlError::TooLarge);
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                stack.push(Element {
                    name: local.as_str().to_string(),
                    ..Element::default()
                });
            }
            Token::ElementEnd { end, .. } => {
                if let ElementEnd::Open = end {
                    continue;
                }
                if let ElementEnd::Close(_, local) = end {
                    let open = stack.last().map(|e| e.name.as_str());
                    if open != Some(local.as_str()) {
                        return Err(XmlError::Syntax(format!(
                            "`</{}>` closes `{}`",
                            local.as_str(),
                            open.unwrap_or("nothing")
                        )));
                    }
                }
                let Some(done) = stack.pop() else {
                    return Err(XmlError::Syntax("an end tag without a start".into()));
                };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(done),
                    None => root = Some(done),
                }
            }
            Token::Text { text } => {
                if let Some(open) = stack.last_mut() {
                    unescape_into(text.as_str(), &mut open.text)?;
                }
            }
            Token::Cdata { text, .. } => {
                if let Some(open) = stack.last_mut() {
                    open.text.push_str(text.as_str());
                }
            }
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(XmlError::Syntax(
            "the document ends inside an element".into(),
        ));
    }
    root.ok_or(XmlError::Empty)
}

/// Appends `text` with `&lt;`, `&gt;`, `&amp;`, `&quot;`, `&apos;`, `&#N;` and `&#xN;`
/// decoded; any other entity is an error (EC2 uses no DTD).
fn unescape_into(text: &str, out: &mut String) -> Result<(), XmlError> {
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let end = after
            .find(';')
            .ok_or_else(|| XmlError::Syntax("an unterminated entity".into()))?;
        let entity = &after[..end];
        let decoded = match entity {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let number = if let Some(hex) = entity.strip_prefix("#x") {
                    u32::from_str_radix(hex, 16).ok()
                } else if let Some(dec) = entity.strip_prefix('#') {
                    dec.parse().ok()
                } else {
                    None
                };
                number
                    .and_then(char::from_u32)
                    .ok_or_else(|| XmlError::Syntax(format!("an unknown entity `&{entity};`")))?
            }
        };
        out.push(decoded);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_tree_with_local_names_and_decoded_text() {
        let doc = parse(
            r#"<?xml version="1.0" encoding="UTF-8"?>
            <R xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><a:x xmlns:a="u">1 &amp; 2 &#x41;&#66;</a:x>
            <set><item>one</item><item><![CDATA[<two>]]></item></set><empty/></R>"#,
        )
        .unwrap();
        assert_eq!(doc.name, "R");
        assert_eq!(doc.text_of("x"), Some("1 & 2 AB"));
        let items: Vec<_> = doc.items("set").map(|i| i.text.as_str()).collect();
        assert_eq!(items, ["one", "<two>"]);
        assert_eq!(doc.text_of("empty"), None);
        assert_eq!(doc.items("missing").count(), 0);
    }

    #[test]
    fn refuses_broken_deep_and_unknown_entities() {
        assert!(matches!(parse("<a><b></a>"), Err(XmlError::Syntax(_))));
        assert!(matches!(parse("<a>"), Err(XmlError::Syntax(_))));
        assert!(matches!(parse(""), Err(XmlError::Empty)));
        assert!(matches!(parse("<a>&foo;</a>"), Err(XmlError::Syntax(_))));
        assert!(matches!(parse("<a/><b/>"), Err(XmlError::Syntax(_))));
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        assert_eq!(parse(&deep), Err(XmlError::TooDeep));
        let ok = "<a>".repeat(MAX_DEPTH) + &"</a>".repeat(MAX_DEPTH);
        assert!(parse(&ok).is_ok());
    }
}
