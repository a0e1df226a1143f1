"""What tag names say about each other, for the card's ``excludes``.

``instrumental`` means music with no voice (trainer/data/rendered.py labels it so;
MagnaTagATune's ``no vocals`` says it outright), so it cannot be on while a voice tag is. A model
scores each tag on its own and can score both high: on held-out real speech, the `speech`
score ranks far better than `instrumental`'s (docs/training.md), so the card lets the
voice decide and tagd turns `instrumental` off while a voice tag is on
(``ModelCard.exclude``). Scores are published unchanged; only on/off is.
"""

from __future__ import annotations

# Tags that mean a voice is heard, in the vocabularies the trainer knows (the rendered
# set's, MagnaTagATune's top 50). Not ``choir``: in the rendered set it is an instrument
# family (General MIDI's choir programs), a timbre tag that fires on real music it never
# heard; gating on it turned instrumental off for 12 % more of the held-out real music.
VOICE_TAGS = (
    "speech",
    "vocal",
    "vocals",
    "voice",
    "singing",
    "male vocal",
    "female vocal",
)
NO_VOICE_TAGS = ("instrumental", "no vocal", "no vocals", "no voice")


def exclusions(tags: list[str]) -> dict[str, list[str]]:
    """The card's ``excludes`` for a model with these tags: each no-voice tag is off while
    a voice tag is on."""
    voices = [tag for tag in tags if tag in VOICE_TAGS]
    if not voices:
        return {}
    return {tag: voices for tag in tags if tag in NO_VOICE_TAGS}
