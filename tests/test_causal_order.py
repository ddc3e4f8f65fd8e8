"""The order of causal attention's programs (looplm.kernels) and the list-scheduling simulation that
chose it (bench.roofline): its basics, and what it says at issue 20's shapes."""
import pytest

from bench import roofline
from looplm.kernels import SECTION_KV_BYTES, attention_program, attention_section, head_kv_bytes


@pytest.mark.parametrize("heads, m_blocks, section", [(1, 1, 1), (6, 4, 1), (6, 4, 4), (6, 4, 6), (7, 3, 3)])
def test_every_query_block_of_every_head_is_one_program(heads, m_blocks, section):
    programs = [attention_program(pid, m_blocks, heads, section) for pid in range(heads * m_blocks)]
    assert sorted(programs) == [(h, b) for h in range(heads) for b in range(m_blocks)]
    first = programs[:section * m_blocks]  # the first section: its heads only, heaviest blocks first
    assert {h for h, _ in first} == set(range(min(section, heads)))
    assert [b for _, b in first] == sorted((b for _, b in first), reverse=True)


def test_one_head_per_section_is_head_by_head_and_one_section_is_longest_first():
    assert [attention_program(pid, 3, 2, 1) for pid in range(6)] == [(0, 2), (0, 1), (0, 0), (1, 2), (1, 1), (1, 0)]
    assert [attention_program(pid, 3, 2, 2) for pid in range(6)] == [(0, 2), (1, 2), (0, 1), (1, 1), (0, 0), (1, 0)]


def test_sections_hold_what_fits_the_budget_split_evenly():
    assert attention_section(64, SECTION_KV_BYTES // 64) == 64  # all fit: one section
    assert attention_section(64, SECTION_KV_BYTES // 48) == 32  # 48 fit: two even sections, not 48 + 16
    assert attention_section(5, 2 * SECTION_KV_BYTES) == 1  # not even one fits: head by head
    for heads, kv in ((384, 2 ** 19), (100, 3 * 2 ** 20), (7, 7 * 2 ** 20)):
        section = attention_section(heads, kv)
        assert section * kv <= SECTION_KV_BYTES and -(-heads // section) == -(-heads // (SECTION_KV_BYTES // kv))


def test_list_scheduling_hands_each_program_to_the_slot_that_frees_first():
    assert roofline.list_schedule([3, 3, 2, 2, 2], 2) == [(0, 3), (0, 3), (3, 5), (3, 5), (5, 7)]
    assert max(end for _, end in roofline.list_schedule([1] * 10, 4)) == 3  # ceil(10 / 4) waves
    assert roofline.causal_block_keys(256, 64, 32) == [64, 128, 192, 256]
    assert roofline.causal_block_keys(100, 64, 64) == [64, 100]  # the ragged last block reads all 100 keys


def test_the_simulated_schedule_and_its_ideal():
    one = roofline.causal_schedule(heads=1, t=256, d=64, block_m=64, block_n=64, section=1, slots=4)
    assert one.makespan == one.ideal == 256  # four programs on four slots: the heaviest decides
    assert one.live_kv_bytes == 2 * 256 * 64 * roofline.ITEMSIZE
    many = roofline.causal_schedule(heads=8, t=256, d=64, block_m=64, block_n=64, section=8, slots=4)
    assert many.ideal == 8 * (64 + 128 + 192 + 256) / 4 and many.makespan >= many.ideal


def test_at_the_issues_shapes_longest_first_in_l2_sections_packs_as_well_as_across_all_heads():
    """What the kernels' order rests on: head by head leaves the last wave ragged where B x H is small,
    longest first across all heads packs it but keeps every head's K and V live at once, and sections of
    heads whose K and V fit SECTION_KV_BYTES pack within 2% of it with two sections live at most."""
    for heads, t, d in roofline.CAUSAL_ORDER_SHAPES:
        kv = head_kv_bytes(t, d, roofline.ITEMSIZE)
        schedules = {name: roofline.causal_schedule(heads, t, d, 128, 128, section)
                     for name, section in (("head", 1), ("all", heads), ("sections", attention_section(heads, kv)))}
        assert schedules["sections"].over_ideal <= 1.02 * schedules["all"].over_ideal, (heads, t, d)
        assert schedules["sections"].over_ideal <= schedules["head"].over_ideal, (heads, t, d)
        assert schedules["sections"].live_kv_bytes <= 2 * SECTION_KV_BYTES, (heads, t, d)
    # 64 heads of T = 1024 in 128 x 128 tiles: 512 programs of 8 sizes on 132 SMs
    head_by_head, longest_first = (roofline.causal_schedule(64, 1024, 64, 128, 128, s) for s in (1, 64))
    assert head_by_head.over_ideal > 1.2 and longest_first.over_ideal < 1.05
