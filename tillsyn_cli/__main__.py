from tillsyn_cli.main import main

main()
