use super::*;

fn source_xml(extra_cmdline: &str) -> String {
    format!(
        "<domain type='qemu' xmlns:qemu='{QEMU_NS}'>
  <name>vm1</name>
  <uuid>6f3c1d0e-5a2b-4c3d-9e8f-0a1b2c3d4e5f</uuid>
  <memory unit='KiB'>2097152</memory>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <devices>
    <channel type='unix'>
      <source mode='bind' path='/run/dbmigrate/vm1.hints'/>
      <target type='virtio' name='org.dbmigrate.hints'/>
    </channel>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:/run/dbmigrate/vm1.qmp,server=on,wait=off'/>{extra_cmdline}
    <qemu:env name='LD_PRELOAD' value='/usr/lib/dbmigrate/libdbmigrate_preload.so'/>
  </qemu:commandline>
</domain>
"
    )
}

#[test]
fn a_source_domain_gives_its_qmp_socket_and_channel() {
    let d = parse(&source_xml("")).unwrap();
    assert_eq!(d.name.as_str(), "vm1");
    assert_eq!(d.uuid, "6f3c1d0e-5a2b-4c3d-9e8f-0a1b2c3d4e5f");
    assert_eq!(d.qmp, PathBuf::from("/run/dbmigrate/vm1.qmp"));
    assert_eq!(d.hints, Some(PathBuf::from("/run/dbmigrate/vm1.hints")));
}

#[test]
fn what_dbmigrate_cannot_use_is_named() {
    let x = source_xml("");
    let private = x.replace("mode='shared'", "mode='private'");
    assert_eq!(
        parse(&private),
        Err(DomainError::NotSharedFile("vm1".into()))
    );
    let memfd = x.replace("type='file'", "type='memfd'");
    assert_eq!(parse(&memfd), Err(DomainError::NotSharedFile("vm1".into())));
    let huge = x.replace("<source type='file'/>", "<hugepages/>");
    assert_eq!(
        parse(&huge),
        Err(DomainError::HugepagesDirectory("vm1".into()))
    );
    let no_qmp = x.replace("'-qmp'", "'-S'");
    assert_eq!(parse(&no_qmp), Err(DomainError::NoQmp("vm1".into())));
    let tcp = x.replace("unix:/run/dbmigrate/vm1.qmp", "unix:relative.qmp");
    assert!(matches!(parse(&tcp), Err(DomainError::BadQmp { .. })));
    let no_uuid = x.replace("<uuid>6f3c1d0e-5a2b-4c3d-9e8f-0a1b2c3d4e5f</uuid>", "");
    assert_eq!(parse(&no_uuid), Err(DomainError::NoUuid("vm1".into())));
    let numa = x.replace(
        "<devices>",
        "<cpu><numa><cell id='0' cpus='0' memory='1' unit='GiB'/><cell id='1' cpus='1' memory='1' unit='GiB'/></numa></cpu><devices>",
    );
    // A memory backend per cell, each a file under memory_backing_dir:
    // moved as one run of pages.
    assert_eq!(parse(&numa).unwrap().name.to_string(), "vm1");
    assert!(matches!(parse("<domain"), Err(DomainError::Parse(_))));
    assert_eq!(
        parse("<network><name>x</name></network>"),
        Err(DomainError::NotDomain("network".into()))
    );
    let big = format!("<domain>{}</domain>", " ".repeat(MAX_XML_BYTES));
    assert!(matches!(parse(&big), Err(DomainError::TooLarge { .. })));
}

#[test]
fn names_that_virsh_would_read_otherwise_are_refused() {
    assert!(DomainName::new("db-01.example").is_ok());
    assert_eq!(DomainName::new(""), Err(NameError::Empty));
    assert!(matches!(
        DomainName::new("--all"),
        Err(NameError::Character(_))
    ));
    assert!(matches!(
        DomainName::new("a/b"),
        Err(NameError::Character(_))
    ));
    assert!(matches!(
        DomainName::new("a\nb"),
        Err(NameError::Character(_))
    ));
    assert!(matches!(
        DomainName::new(&"x".repeat(MAX_NAME_BYTES + 1)),
        Err(NameError::TooLong(_))
    ));
    // virsh takes these for an id or a UUID before a name.
    for id_like in [
        "5",
        "0042",
        "6f3c1d0e-5a2b-4c3d-9e8f-0a1b2c3d4e5f",
        "6f3c1d0e5a2b4c3d9e8f0a1b2c3d4e5f",
    ] {
        assert!(
            matches!(DomainName::new(id_like), Err(NameError::IdLike(_))),
            "{id_like}"
        );
    }
    assert!(DomainName::new("db5").is_ok());
    let x = source_xml("").replace("<name>vm1</name>", "<name>-c</name>");
    assert!(matches!(parse(&x), Err(DomainError::Name(_))));
}

#[test]
fn the_incoming_domain_waits_and_keeps_the_rest_of_the_text() {
    let x = source_xml("");
    let inc = incoming_xml(&x, &[("DBMIGRATE_POSTCOPY_SOCKET", "/run/d/u'x.sock")]).unwrap();
    let doc = roxmltree::Document::parse(&inc).unwrap();
    let args = qemu_args(doc.root_element());
    assert_eq!(
        args,
        [
            "-qmp",
            "unix:/run/dbmigrate/vm1.qmp,server=on,wait=off",
            "-incoming",
            "defer"
        ]
    );
    let env: Vec<_> = commandline(doc.root_element())
        .unwrap()
        .children()
        .filter(|c| c.tag_name().name() == "env")
        .map(|c| (c.attribute("name").unwrap(), c.attribute("value").unwrap()))
        .collect();
    assert_eq!(
        env,
        [
            ("LD_PRELOAD", "/usr/lib/dbmigrate/libdbmigrate_preload.so"),
            ("DBMIGRATE_POSTCOPY_SOCKET", "/run/d/u'x.sock")
        ]
    );
    // Only the insertion differs.
    let cut = inc.find("<qemu:arg value='-incoming'").unwrap();
    assert_eq!(&inc[..cut], &x[..cut]);
    assert!(inc.ends_with("</qemu:commandline>\n</domain>\n"));
    // Done twice is refused: that XML is a destination's.
    assert_eq!(
        incoming_xml(&inc, &[]),
        Err(DomainError::HasIncoming("vm1".into()))
    );
    assert!(matches!(
        incoming_xml(&x, &[("LD_PRELOAD", "/x")]),
        Err(DomainError::EnvTaken { .. })
    ));
}

#[test]
fn other_prefixes_and_self_closing_elements_are_followed() {
    let x = source_xml("")
        .replace("xmlns:qemu=", "xmlns:q=")
        .replace("qemu:", "q:");
    let inc = incoming_xml(&x, &[]).unwrap();
    assert!(inc.contains("<q:arg value='-incoming'/><q:arg value='defer'/></q:commandline>"));
    let doc = roxmltree::Document::parse(&inc).unwrap();
    assert_eq!(qemu_args(doc.root_element()).len(), 4);
    // The namespace declared as the default one on the element.
    let d = format!(
        "<domain><name>v</name><uuid>u</uuid><memoryBacking><source type='file'/><access mode='shared'/></memoryBacking><commandline xmlns='{QEMU_NS}'><arg value='-qmp'/><arg value='unix:/q,server=on'/></commandline></domain>"
    );
    let inc = incoming_xml(&d, &[]).unwrap();
    assert!(inc.contains("<arg value='-incoming'/><arg value='defer'/></commandline>"));
    let doc = roxmltree::Document::parse(&inc).unwrap();
    assert_eq!(qemu_args(doc.root_element()).len(), 4);
}

#[test]
fn qmp_arguments() {
    assert_eq!(qmp_socket("unix:/a/b.qmp"), Some(PathBuf::from("/a/b.qmp")));
    assert_eq!(
        qmp_socket("unix:/a/b.qmp,server,nowait"),
        Some(PathBuf::from("/a/b.qmp"))
    );
    assert_eq!(qmp_socket("tcp:127.0.0.1:4444"), None);
    assert_eq!(qmp_socket("unix:"), None);
    assert_eq!(qmp_socket("unix:/"), None);
}
