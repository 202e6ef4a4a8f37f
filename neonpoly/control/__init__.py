"""The application layer the faces (CLI, console) call: the Control interface and its two
implementations (a proxy in this process, or one attached over the admin database), and
`start_serving`, the one way a proxy is put to work from the state dir."""
