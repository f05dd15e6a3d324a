//! The exported descriptor set is what reflection clients see: it must describe both services.

use prost::Message;

#[test]
fn descriptor_set_describes_both_services() {
    let set = prost_types::FileDescriptorSet::decode(rcsync_proto::FILE_DESCRIPTOR_SET).unwrap();
    let services: Vec<String> = set
        .file
        .iter()
        .filter(|f| f.package() == "rcsync.v1")
        .flat_map(|f| f.service.iter().map(|s| format!("rcsync.v1.{}", s.name())))
        .collect();
    assert!(
        services.contains(&rcsync_proto::RUNTIME_CLASS_SYNC_SERVICE.to_string()),
        "{services:?}"
    );
    assert!(
        services.contains(&rcsync_proto::POD_SYNC_SERVICE.to_string()),
        "{services:?}"
    );
    // Documentation travels with the descriptors (source info), so reflection clients show it.
    assert!(set.file.iter().all(|f| f.source_code_info.is_some()));
}
