"""The dvt command line: the parser, one module per subcommand, the pictures it writes."""
