"""Research code of a source checkout, outside the installed package: the scripts that trained, packaged and
measured the offline preset (research/README.md says what each command reproduces)."""
