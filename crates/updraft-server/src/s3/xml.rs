//! The little XML S3 needs: a writer for responses and a small, strict-enough parser
//! for the few request bodies (versioning configuration, multi-object delete, multipart
//! completion). The parser keeps local names only (namespace prefixes are dropped),
//! ignores attributes, comments and processing instructions, and refuses DTDs.

use thiserror::Error;

/// The S3 XML namespace.
pub const NS: &str = "http://s3.amazonaws.com/doc/2006-03-01/";
pub const DECLARATION: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";

/// Escapes text for element content (and attribute values).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Keep carriage returns through end-of-line normalisation; other control
            // characters are written as references, as S3 does.
            '\r' => out.push_str("&#13;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => {
                out.push_str(&format!("&#{};", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// Builds an XML document element by element.
pub struct XmlWriter {
    buf: String,
}

impl XmlWriter {
    /// Starts a document whose root element carries the S3 namespace.
    pub fn new(root: &str) -> Self {
        XmlWriter {
            buf: format!("<{root} xmlns=\"{NS}\">"),
        }
    }

    pub fn open(&mut self, name: &str) -> &mut Self {
        self.buf.push('<');
        self.buf.push_str(name);
        self.buf.push('>');
        self
    }

    pub fn close(&mut self, name: &str) -> &mut Self {
        self.buf.push_str("</");
        self.buf.push_str(name);
        self.buf.push('>');
        self
    }

    /// `<name>text</name>`, text escaped.
    pub fn elem(&mut self, name: &str, text: &str) -> &mut Self {
        self.open(name);
        self.buf.push_str(&escape(text));
        self.close(name)
    }

    /// An element only when there is a value.
    pub fn opt(&mut self, name: &str, text: Option<&str>) -> &mut Self {
        if let Some(t) = text {
            self.elem(name, t);
        }
        self
    }

    /// Closes the root and returns the document (without XML declaration).
    pub fn finish(mut self, root: &str) -> String {
        self.close(root);
        self.buf
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum XmlError {
    #[error("the XML is not well-formed: {0}")]
    Malformed(&'static str),
    #[error("the XML body is not UTF-8")]
    NotUtf8,
    #[error("unknown XML entity '&{0};'")]
    Entity(String),
    #[error("mismatched closing tag </{found}> for <{open}>")]
    Mismatch { open: String, found: String },
    #[error("the XML nests too deeply")]
    TooDeep,
    #[error("document type declarations are not accepted")]
    Doctype,
}

/// A parsed element: local name, child elements, and its own text content.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Element {
    pub name: String,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The raw text of a child (untrimmed: keys may carry significant whitespace).
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }
}

const MAX_DEPTH: usize = 32;

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

fn local_name(name: &str) -> &str {
    name.rsplit(':').next().unwrap_or(name)
}

fn decode_entity(name: &str) -> Result<char, XmlError> {
    let c = match name {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "quot" => '"',
        "apos" => '\'',
        _ => {
            let code =
                if let Some(hex) = name.strip_prefix("#x").or_else(|| name.strip_prefix("#X")) {
                    u32::from_str_radix(hex, 16).ok()
                } else if let Some(dec) = name.strip_prefix('#') {
                    dec.parse::<u32>().ok()
                } else {
                    None
                };
            return code
                .and_then(char::from_u32)
                .ok_or_else(|| XmlError::Entity(name.to_owned()));
        }
    };
    Ok(c)
}

/// Appends `raw` text to `out`, resolving entity and character references.
fn unescape_into(raw: &str, out: &mut String) -> Result<(), XmlError> {
    let mut rest = raw;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let end = after
            .find(';')
            .ok_or(XmlError::Malformed("unterminated entity reference"))?;
        out.push(decode_entity(&after[..end])?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(())
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn skip_ws(&mut self) {
        let r = self.rest();
        self.pos += r.len() - r.trim_start().len();
    }

    /// Skips past the next `end`, failing with `what` if there is none.
    fn skip_past(&mut self, end: &str, what: &'static str) -> Result<&'a str, XmlError> {
        let r = self.rest();
        let i = r.find(end).ok_or(XmlError::Malformed(what))?;
        self.pos += i + end.len();
        Ok(&r[..i])
    }

    /// Skips whitespace, comments and processing instructions.
    fn skip_misc(&mut self) -> Result<(), XmlError> {
        loop {
            self.skip_ws();
            let r = self.rest();
            if r.starts_with("<?") {
                self.skip_past("?>", "unterminated processing instruction")?;
            } else if r.starts_with("<!--") {
                self.skip_past("-->", "unterminated comment")?;
            } else if r.starts_with("<!DOCTYPE") || r.starts_with("<!doctype") {
                return Err(XmlError::Doctype);
            } else {
                return Ok(());
            }
        }
    }

    fn name(&mut self) -> Result<&'a str, XmlError> {
        let r = self.rest();
        let end = r
            .find(|c: char| c.is_whitespace() || c == '/' || c == '>' || c == '=')
            .unwrap_or(r.len());
        if end == 0 {
            return Err(XmlError::Malformed("expected a name"));
        }
        self.pos += end;
        Ok(&r[..end])
    }

    fn element(&mut self, depth: usize) -> Result<Element, XmlError> {
        if depth > MAX_DEPTH {
            return Err(XmlError::TooDeep);
        }
        if !self.rest().starts_with('<') {
            return Err(XmlError::Malformed("expected an element"));
        }
        self.pos += 1;
        let qname = self.name()?;
        let mut el = Element {
            name: local_name(qname).to_owned(),
            ..Element::default()
        };
        // Attributes are read and ignored.
        loop {
            self.skip_ws();
            let r = self.rest();
            if r.starts_with("/>") {
                self.pos += 2;
                return Ok(el);
            }
            if r.starts_with('>') {
                self.pos += 1;
                break;
            }
            self.name()?;
            self.skip_ws();
            if !self.rest().starts_with('=') {
                return Err(XmlError::Malformed("expected '=' after an attribute name"));
            }
            self.pos += 1;
            self.skip_ws();
            let quote = match self.rest().chars().next() {
                Some(q @ ('"' | '\'')) => q,
                _ => return Err(XmlError::Malformed("attribute values must be quoted")),
            };
            self.pos += 1;
            let close = if quote == '"' { "\"" } else { "'" };
            self.skip_past(close, "unterminated attribute value")?;
        }
        // Content.
        loop {
            let r = self.rest();
            if r.is_empty() {
                return Err(XmlError::Malformed("unexpected end of document"));
            }
            if r.starts_with("</") {
                self.pos += 2;
                let closing = self.name()?;
                self.skip_ws();
                if !self.rest().starts_with('>') {
                    return Err(XmlError::Malformed("expected '>' in a closing tag"));
                }
                self.pos += 1;
                if closing != qname {
                    return Err(XmlError::Mismatch {
                        open: qname.to_owned(),
                        found: closing.to_owned(),
                    });
                }
                return Ok(el);
            } else if r.starts_with("<!--") {
                self.skip_past("-->", "unterminated comment")?;
            } else if r.starts_with("<![CDATA[") {
                self.pos += "<![CDATA[".len();
                let data = self.skip_past("]]>", "unterminated CDATA section")?;
                el.text.push_str(data);
            } else if r.starts_with("<?") {
                self.skip_past("?>", "unterminated processing instruction")?;
            } else if r.starts_with("<!") {
                return Err(XmlError::Doctype);
            } else if r.starts_with('<') {
                let child = self.element(depth + 1)?;
                el.children.push(child);
            } else {
                let end = r.find('<').unwrap_or(r.len());
                unescape_into(&r[..end], &mut el.text)?;
                self.pos += end;
            }
        }
    }
}

/// Parses a document and returns its root element.
pub fn parse(input: &[u8]) -> Result<Element, XmlError> {
    let s = std::str::from_utf8(input).map_err(|_| XmlError::NotUtf8)?;
    let s = s.strip_prefix('\u{feff}').unwrap_or(s);
    let mut p = Parser { s, pos: 0 };
    p.skip_misc()?;
    let root = p.element(0)?;
    p.skip_misc()?;
    if !p.rest().is_empty() {
        return Err(XmlError::Malformed("content after the root element"));
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(
            escape("a<b>&\"c\"'d'"),
            "a&lt;b&gt;&amp;&quot;c&quot;&apos;d&apos;"
        );
        assert_eq!(escape("x\ry\u{1}z\n"), "x&#13;y&#1;z\n");
        let mut w = XmlWriter::new("R");
        w.elem("Key", "a&b").opt("None", None).open("P").close("P");
        assert_eq!(
            w.finish("R"),
            format!("<R xmlns=\"{NS}\"><Key>a&amp;b</Key><P></P></R>")
        );
    }

    #[test]
    fn parses_with_namespaces_attributes_and_whitespace() {
        let doc = br#"<?xml version="1.0" encoding="UTF-8"?>
            <!-- a comment -->
            <s3:Delete xmlns:s3="http://s3.amazonaws.com/doc/2006-03-01/" a='1'>
              <s3:Quiet>true</s3:Quiet>
              <s3:Object><s3:Key> a&amp;b&#x41;&#66; </s3:Key></s3:Object>
              <s3:Object><s3:Key><![CDATA[<raw>]]></s3:Key><VersionId/></s3:Object>
            </s3:Delete>"#;
        let root = parse(doc).expect("parses");
        assert_eq!(root.name, "Delete");
        assert_eq!(root.child_text("Quiet").map(str::trim), Some("true"));
        let keys: Vec<&str> = root
            .children_named("Object")
            .filter_map(|o| o.child_text("Key"))
            .collect();
        assert_eq!(keys, vec![" a&bAB ", "<raw>"]);
        assert_eq!(
            root.children_named("Object")
                .nth(1)
                .and_then(|o| o.child_text("VersionId")),
            Some("")
        );
    }

    #[test]
    fn rejects_bad_documents() {
        assert!(matches!(
            parse(b"<a><b></a>"),
            Err(XmlError::Mismatch { .. })
        ));
        assert!(parse(b"<a>").is_err());
        assert!(parse(b"").is_err());
        assert!(parse(b"<a></a><b></b>").is_err());
        assert!(matches!(parse(b"<a>&bogus;</a>"), Err(XmlError::Entity(_))));
        assert!(matches!(
            parse(b"<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>"),
            Err(XmlError::Doctype)
        ));
        assert_eq!(parse(&[0xff, 0xfe]), Err(XmlError::NotUtf8));
        let deep = format!("{}{}", "<a>".repeat(40), "</a>".repeat(40));
        assert_eq!(parse(deep.as_bytes()), Err(XmlError::TooDeep));
    }
}
