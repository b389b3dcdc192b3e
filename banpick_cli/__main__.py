from banpick_cli.cli.app import main

main()
