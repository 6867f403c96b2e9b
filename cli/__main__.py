from gvsl.cli.main import main

main()
