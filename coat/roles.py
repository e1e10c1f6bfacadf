"""What each expert stands for in the method, and the expert a config gets when it names a role.

The paper's thinking slots regress five kinds of expert knowledge (`PAPER_ROLES`); the others are auxiliary
targets kept for ablations. `experts.names` may list a role instead of an expert: it stands for that role's
default expert. Kept free of heavy imports: the config resolves roles before anything is built.
"""

PAPER_ROLES = ("pitch", "phonetic", "affect", "sound-events", "reconstruction")
AUXILIARY_ROLES = ("prosody", "speaker", "speech-activity")

# role -> the expert a config gets when it names the role
ROLE_DEFAULTS = {
    "pitch": "pitch",
    "phonetic": "phonetic",
    "affect": "egemaps",
    "sound-events": "sound-events",
    "reconstruction": "mel",
    "prosody": "prosody",
    "speaker": "speaker",
    "speech-activity": "vad",
}


def resolve_roles(names: list[str]) -> list[str]:
    """`names` with every role replaced by its default expert (expert names pass through), duplicates kept so
    the config check can name them."""
    return [ROLE_DEFAULTS.get(name, name) for name in names]
