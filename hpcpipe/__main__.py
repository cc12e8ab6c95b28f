from hpcpipe.cli import main

main()
