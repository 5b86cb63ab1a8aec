"""cri.convert refuses silent drops: every proto field it translates is mapped or listed in IGNORED."""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool

from moorage.cri import convert
from moorage.cri.api import api_pb2 as pb


def test_every_translated_proto_field_is_mapped_or_ignored_with_a_reason():
    unmapped, stale = convert.field_coverage()
    assert unmapped == [], f"proto fields the model drops silently; map them or add them to convert.IGNORED: {unmapped}"
    assert stale == [], f"convert.IGNORED lists fields that are mapped or do not exist: {stale}"
    assert all(why.strip() for why in convert.IGNORED.values())


def _api_with_new_fields(*where: str) -> dict:
    """api.proto's messages with a field ``brand_new`` added to each message named in ``where``."""
    fdp = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "moorage/test/api_with_new_fields.proto"
    for m in fdp.message_type:
        if m.name in where:
            m.field.add(name="brand_new", number=999, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return dict(pool.FindFileByName(fdp.name).message_types_by_name)


def test_a_new_field_in_api_proto_fails_the_walk():
    # At the top of a translated message and deep inside one (Mount via ContainerConfig.mounts,
    # SecurityProfile via ...security_context.seccomp).
    unmapped, _ = convert.field_coverage(_api_with_new_fields("ContainerConfig", "Mount", "SecurityProfile"))
    assert unmapped == ["ContainerConfig.brand_new", "Mount.brand_new", "SecurityProfile.brand_new"]
    # A message convert does not translate is not its business.
    assert convert.field_coverage(_api_with_new_fields("VersionRequest")) == ([], [])


def test_a_field_read_by_a_special_case_is_checked_too():
    # ContainerConfig.image is read for .image and .user_specified_image only, Mount.image (image
    # volumes) by name: a new ImageSpec field is a drop in both places.
    unmapped, _ = convert.field_coverage(_api_with_new_fields("ImageSpec"))
    assert unmapped == ["ContainerConfig.image.brand_new", "ImageSpec.brand_new"]
