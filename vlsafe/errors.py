"""The one error type for bad input: the CLI prints its message on one line and exits with status 2."""


class VlsafeError(Exception):
    """Bad input (a file, record, field, spec or value) named in one line. Several problems found at once (every
    missing dataset of a suite, every missing input of a study) are given as `VlsafeError.lines([...])`: the CLI
    prints one line per problem, each still kept to a single line."""

    problems: tuple[str, ...] = ()

    @classmethod
    def lines(cls, problems: list[str]) -> "VlsafeError":
        err = cls("\n".join(problems))
        err.problems = tuple(problems)
        return err
