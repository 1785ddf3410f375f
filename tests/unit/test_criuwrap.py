"""wpdump-criu's reading of CRIU's command line (which command, which options it acts on)."""

from __future__ import annotations

from wpdump.criuwrap.cmdline import _split


def test_split_reads_lxc_style_pre_dump_arguments():
    args = ["pre-dump", "--tcp-established", "--manage-cgroups=full", "-vvvvvv", "--tree", "1234", "--images-dir",
            "/ck/2", "-o", "pre-dump.log", "--track-mem", "--prev-images-dir=../1", "--external", "mnt[]:m"]
    command, vals, rest = _split(args)
    assert command == "pre-dump"
    assert vals == {"tree": ["1234"], "images": ["/ck/2"], "log": ["pre-dump.log"], "prev": ["../1"]}
    assert rest == args[1:]  # everything but the command passes through unchanged


def test_split_short_options_attached_and_options_before_the_command():
    command, vals, rest = _split(["-v4", "dump", "-t5", "-D", "img", "-W/w", "--prev-images-dir", "../p"])
    assert command == "dump"
    assert vals == {"tree": ["5"], "images": ["img"], "work": ["/w"], "prev": ["../p"]}
    assert rest == ["-v4", "-t5", "-D", "img", "-W/w", "--prev-images-dir", "../p"]


def test_split_check_features_and_swrk():
    assert _split(["check", "--feature", "mem_dirty_track", "--feature=lazy_pages"])[1] == {
        "feature": ["mem_dirty_track", "lazy_pages"]}
    assert _split(["swrk", "3"])[::2] == ("swrk", ["3"])
    # a value that happens to be a command name is the option's value, not the command
    assert _split(["dump", "-D", "restore"])[:2] == ("dump", {"images": ["restore"]})
