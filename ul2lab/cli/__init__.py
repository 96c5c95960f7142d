"""The command line: flag parsing only. Each command builds a config and calls one library function
(ul2lab.runs, ul2lab.interop, ul2lab.data.vocab). Nothing in the library imports this package; the
`ul2lab` console script enters at ul2lab.cli.main:main.
"""
