"""The single ``tillsyn`` command line: one subcommand group per job."""
