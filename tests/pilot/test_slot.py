"""The slot description the pilot sends to the matcher."""

from __future__ import annotations

from galaxy_dirac.pilot.slot import Slot, detect_memory_mb, detect_platform, detect_processors, processor_tags


def test_processor_tags():
    assert processor_tags(0) == []
    assert processor_tags(1) == ["1Processors"]
    assert processor_tags(4) == ["1Processors", "2Processors", "3Processors", "4Processors", "MultiProcessor"]


def test_describe_offers_free_cores_memory_and_time_left():
    now = [1000.0]
    slot = Slot(
        site="LCG.Test.org",
        ce="ce.test.org",
        queue="long",
        platform="Linux_x86_64_glibc-2.36",
        tags=["GPU", ""],
        runtimes=(),
        processors=4,
        memory_mb=8000,
        cpu_time=3600,
        stamp="abc",
        clock=lambda: now[0],
    )
    now[0] += 600
    assert slot.time_left() == 3000
    body = slot.describe(free_processors=2, free_memory_mb=3000)
    assert body == {
        "Site": "LCG.Test.org",
        "GridCE": "ce.test.org",
        "Queue": "long",
        "Platform": "Linux_x86_64_glibc-2.36",
        "Tags": ["GPU", "1Processors", "2Processors", "MultiProcessor"],
        "NumberOfProcessors": 2,
        "MaxRAM": 3000,
        "CPUTime": 3000,
        "PilotStamp": "abc",
    }
    assert slot.describe(1)["Tags"] == ["GPU", "1Processors"]
    registration = slot.registration("wn01")
    assert registration["processors"] == 4 and registration["memory_mb"] == 8000 and registration["hostname"] == "wn01"
    assert "4Processors" in registration["tags"]
    now[0] += 10_000
    assert slot.time_left() == 0


def test_detection_gives_sensible_values():
    assert detect_processors() >= 1
    assert detect_memory_mb() > 0
    assert detect_platform().startswith("Linux_")
    slot = Slot(site="S")
    assert slot.processors >= 1 and slot.memory_mb > 0 and slot.cpu_time > 0
