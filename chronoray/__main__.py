from chronoray.cli import main

main()
