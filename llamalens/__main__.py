from llamalens.cli import main

main()
