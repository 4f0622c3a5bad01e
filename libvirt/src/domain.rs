//! What a libvirt domain's XML tells dbmigrate, and the XML of the domain
//! that waits for the VM on the destination. Pure: text in, values or text
//! out.
//!
//! dbmigrate needs from the XML (see the README's "With libvirt"):
//! - guest RAM in a shared file: `<memoryBacking>` with `<access
//!   mode='shared'/>` and `<source type='file'/>` (for huge pages, with
//!   libvirt's `memory_backing_dir` on a hugetlbfs mount, not `<hugepages/>`);
//! - a QMP socket of its own beside libvirt's monitor: the first `-qmp
//!   unix:PATH,...` among the `<qemu:commandline>` arguments;
//! - optionally the guest agent's virtio-serial channel, a `unix` channel
//!   whose target is named `org.dbmigrate.hints`.

use std::path::PathBuf;

use thiserror::Error;

/// libvirt's namespace for QEMU command-line passthrough.
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// The virtio-serial port the guest agent talks on.
pub const HINTS_CHANNEL: &str = "org.dbmigrate.hints";
/// Longest domain XML accepted (libvirt's own are a few KiB).
pub const MAX_XML_BYTES: usize = 1 << 20;
/// Longest domain name accepted.
pub const MAX_NAME_BYTES: usize = 200;

/// Why a domain's XML does not suit dbmigrate; each names the fix.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DomainError {
    /// Larger than [`MAX_XML_BYTES`].
    #[error("the domain XML is {len} bytes, more than the {MAX_XML_BYTES} accepted: is this a domain XML?")]
    TooLarge {
        /// Its size.
        len: usize,
    },
    /// Not well-formed XML.
    #[error("the domain XML is not well-formed: {0}")]
    Parse(String),
    /// The root element is not `<domain>`.
    #[error(
        "the XML's root element is <{0}>, not <domain>: give a domain XML (`virsh dumpxml NAME`)"
    )]
    NotDomain(String),
    /// `<name>` missing or unusable.
    #[error("the domain's name is unusable: {0}")]
    Name(#[from] NameError),
    /// `<uuid>` missing: the destination would get another identity.
    #[error("domain {0} has no <uuid>: give the XML libvirt shows for it (`virsh dumpxml --migratable {0}`), which carries it, so the domain keeps its identity on the destination")]
    NoUuid(String),
    /// RAM is not a shared file.
    #[error("domain {0} does not keep its RAM in a shared file, which dbmigrate reads and tracks: add <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking> to its XML")]
    NotSharedFile(String),
    /// `<hugepages/>`: libvirt gives QEMU a directory, where QEMU makes a
    /// file nobody else can open.
    #[error("domain {0} has <hugepages/>, for which libvirt lets QEMU make an unlinked file that dbmigrate cannot open: use <source type='file'/> and <access mode='shared'/>, with memory_backing_dir in qemu.conf on a hugetlbfs mount")]
    HugepagesDirectory(String),
    /// No QMP socket for dbmigrate.
    #[error("domain {0} gives dbmigrate no QMP socket (libvirt keeps QEMU's monitor to itself): add <qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:/run/dbmigrate/{0}.qmp,server=on,wait=off'/></qemu:commandline> (namespace {QEMU_NS})")]
    NoQmp(String),
    /// The QMP argument is not a usable unix socket.
    #[error("domain {name}: the -qmp argument `{arg}` is not `unix:/ABSOLUTE/PATH[,options]`")]
    BadQmp {
        /// Domain.
        name: String,
        /// The argument.
        arg: String,
    },
    /// The XML already passes `-incoming` (a destination's XML, not a source's).
    #[error("domain {0} already passes -incoming to QEMU: give the XML of the running source domain, without it (dbmigrate adds it for the waiting destination)")]
    HasIncoming(String),
    /// An environment variable dbmigrate sets is already there.
    #[error("domain {name} already sets {var} in <qemu:commandline>; dbmigrate sets it for the destination: remove it")]
    EnvTaken {
        /// Domain.
        name: String,
        /// Variable.
        var: String,
    },
}

/// Why a domain name is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    /// Empty.
    #[error("it is empty")]
    Empty,
    /// Longer than [`MAX_NAME_BYTES`].
    #[error("it is {0} bytes long, more than {MAX_NAME_BYTES}")]
    TooLong(usize),
    /// A character libvirt or virsh would read otherwise.
    #[error("`{0}` has a `/`, a control character or a leading `-`, which libvirt does not allow in names or virsh would read as an option")]
    Character(String),
    /// A number or a UUID, which virsh takes for a domain id or UUID first.
    #[error("`{0}` is a number or a UUID, which virsh would take for another domain's id or UUID: give the domain a name")]
    IdLike(String),
}

/// A libvirt domain name, checked so that it can only ever be a name on
/// virsh's command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainName(String);

impl DomainName {
    /// Checks `s`.
    pub fn new(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_BYTES {
            return Err(NameError::TooLong(s.len()));
        }
        if s.starts_with('-') || s.chars().any(|c| c == '/' || c.is_control()) {
            return Err(NameError::Character(s.escape_debug().to_string()));
        }
        let uuid_like = s.len() == 36
            && s.chars().enumerate().all(|(i, c)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            });
        if s.chars().all(|c| c.is_ascii_digit())
            || uuid_like
            || (s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit()))
        {
            return Err(NameError::IdLike(s.to_string()));
        }
        Ok(Self(s.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DomainName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What dbmigrate takes from a domain's XML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    /// `<name>`.
    pub name: DomainName,
    /// `<uuid>`.
    pub uuid: String,
    /// dbmigrate's QMP socket (the first `-qmp unix:` argument).
    pub qmp: PathBuf,
    /// The guest agent's channel socket, if the domain has one.
    pub hints: Option<PathBuf>,
}

fn parse_doc(xml: &str) -> Result<roxmltree::Document<'_>, DomainError> {
    if xml.len() > MAX_XML_BYTES {
        return Err(DomainError::TooLarge { len: xml.len() });
    }
    let doc = roxmltree::Document::parse(xml).map_err(|e| DomainError::Parse(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
        return Err(DomainError::NotDomain(root.tag_name().name().to_string()));
    }
    Ok(doc)
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| {
        c.is_element() && c.tag_name().name() == name && c.tag_name().namespace().is_none()
    })
}

fn text_of(n: roxmltree::Node<'_, '_>, name: &str) -> Option<String> {
    child(n, name)
        .and_then(|c| c.text())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The `<qemu:commandline>` element, if any.
fn commandline<'a, 'i>(root: roxmltree::Node<'a, 'i>) -> Option<roxmltree::Node<'a, 'i>> {
    root.children().find(|c| {
        c.is_element()
            && c.tag_name().name() == "commandline"
            && c.tag_name().namespace() == Some(QEMU_NS)
    })
}

/// The values of the `<qemu:arg>`s, in order.
fn qemu_args(root: roxmltree::Node<'_, '_>) -> Vec<String> {
    commandline(root)
        .map(|cl| {
            cl.children()
                .filter(|c| c.is_element() && c.tag_name().name() == "arg")
                .filter_map(|c| c.attribute("value").map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The path of a `-qmp` argument `unix:/PATH[,opt...]` (pure).
fn qmp_socket(arg: &str) -> Option<PathBuf> {
    let path = arg.strip_prefix("unix:")?.split(',').next()?;
    (path.starts_with('/') && path.len() > 1).then(|| PathBuf::from(path))
}

/// Whether the RAM is a shared file: `<access mode='shared'/>` and a file
/// source (or huge pages, which libvirt backs with a hugetlbfs file).
fn ram_is_shared_file(root: roxmltree::Node<'_, '_>) -> (bool, bool) {
    let Some(mb) = child(root, "memoryBacking") else {
        return (false, false);
    };
    let shared = child(mb, "access").and_then(|a| a.attribute("mode")) == Some("shared");
    let source = child(mb, "source").and_then(|s| s.attribute("type"));
    let huge = child(mb, "hugepages").is_some();
    let file = source == Some("file") || (huge && source.is_none());
    (shared && file, huge)
}

/// The guest agent's channel: a unix channel with target `org.dbmigrate.hints`.
fn hints_channel(root: roxmltree::Node<'_, '_>) -> Option<PathBuf> {
    let devices = child(root, "devices")?;
    devices
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "channel")
        .filter(|c| c.attribute("type") == Some("unix"))
        .find(|c| child(*c, "target").and_then(|t| t.attribute("name")) == Some(HINTS_CHANNEL))
        .and_then(|c| child(c, "source"))
        .and_then(|s| s.attribute("path"))
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
}

/// Reads `xml` and checks that dbmigrate can move the domain.
pub fn parse(xml: &str) -> Result<Domain, DomainError> {
    read_domain(parse_doc(xml)?.root_element())
}

/// [`parse`] of a document already parsed.
fn read_domain(root: roxmltree::Node<'_, '_>) -> Result<Domain, DomainError> {
    let name = DomainName::new(&text_of(root, "name").unwrap_or_default())?;
    let uuid = text_of(root, "uuid").ok_or_else(|| DomainError::NoUuid(name.to_string()))?;
    let (shared_file, hugepages) = ram_is_shared_file(root);
    if hugepages {
        return Err(DomainError::HugepagesDirectory(name.to_string()));
    }
    if !shared_file {
        return Err(DomainError::NotSharedFile(name.to_string()));
    }
    let args = qemu_args(root);
    let qmp_arg = args
        .windows(2)
        .find(|w| w[0] == "-qmp" && w[1].starts_with("unix:"))
        .map(|w| w[1].clone())
        .ok_or_else(|| DomainError::NoQmp(name.to_string()))?;
    let qmp = qmp_socket(&qmp_arg).ok_or_else(|| DomainError::BadQmp {
        name: name.to_string(),
        arg: qmp_arg,
    })?;
    Ok(Domain {
        name,
        uuid,
        qmp,
        hints: hints_channel(root),
    })
}

/// `s` as an XML attribute value between single quotes (pure).
fn attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The XML of the domain that waits for the VM on the destination: `xml`
/// (the source domain's) with QEMU told to wait for an incoming migration
/// (`-incoming defer`, started paused by the caller) and `env` set in
/// QEMU's environment, added to its `<qemu:commandline>`. The rest of the
/// text is kept byte for byte. Pure.
pub fn incoming_xml(xml: &str, env: &[(&str, &str)]) -> Result<String, DomainError> {
    let doc = parse_doc(xml)?;
    let root = doc.root_element();
    let dom = read_domain(root)?;
    if qemu_args(root).iter().any(|a| a == "-incoming") {
        return Err(DomainError::HasIncoming(dom.name.to_string()));
    }
    // parse() found the QMP socket there, so the element exists.
    let cl = commandline(root).ok_or_else(|| DomainError::NoQmp(dom.name.to_string()))?;
    let taken = cl
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "env")
        .filter_map(|c| c.attribute("name"))
        .find(|n| env.iter().any(|(k, _)| k == n));
    if let Some(var) = taken {
        return Err(DomainError::EnvTaken {
            name: dom.name.to_string(),
            var: var.to_string(),
        });
    }
    let r = cl.range();
    let text = &xml[r.clone()];
    // The element's name as written: `qemu:commandline`, or `commandline`
    // where the namespace is the default one.
    let qname = text[1..]
        .split(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .next()
        .unwrap_or("");
    let p = match qname.split_once(':') {
        Some((prefix, _)) => format!("{prefix}:"),
        None => String::new(),
    };
    let mut inner = format!("<{p}arg value='-incoming'/><{p}arg value='defer'/>");
    for (k, v) in env {
        inner.push_str(&format!("<{p}env name='{}' value='{}'/>", attr(k), attr(v)));
    }
    let mut out = String::with_capacity(xml.len() + inner.len() + 16);
    out.push_str(&xml[..r.start]);
    // Before the closing tag (the element holds the QMP arguments, so it
    // is not self-closing).
    let close = text.rfind("</").unwrap_or(text.len());
    out.push_str(&text[..close]);
    out.push_str(&inner);
    out.push_str(&text[close..]);
    out.push_str(&xml[r.end..]);
    Ok(out)
}

#[cfg(test)]
mod tests;
